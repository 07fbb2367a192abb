"""What both benchmarks share: the three model configs, the face data, a random LoRA, and measurement.

`--config tiny` is the test fixture of `tests/tiny_sd21.py`. `--config small` and `--config sd21` are the
real Stable Diffusion 2.1 architecture, built from the configs in `benchmarks/sd21_configs/` with random
weights (compute and memory match the real model; outputs are noise); they differ only in resolution.
Every model is written to a working folder in the diffusers layout, so the scripts under test load it
through the same `from_pretrained(path)` calls as a Hub id. Weights are never committed.
"""

import bisect
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# SD2.1's component configs (no weights), copied from the Hub repo so that anyone can rebuild the same model.
DEFAULT_REFERENCE_DIR = REPO / "benchmarks" / "sd21_configs"
sys.path.insert(0, str(REPO / "tests"))
from tiny_sd21 import build_tiny_sd21, make_face_folder, write_clip_tokenizer  # noqa: E402

CONFIG_RESOLUTIONS = {"tiny": 64, "small": 256, "sd21": 768}  # pixels, square
LORA_RANK = 8  # the published Text2Face LoRA's rank, UNet and text encoder
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # checkpoint-N, also as the start of a temporary name
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # units of the CPU times in /proc/PID/stat


class BenchError(Exception):
    """A user error: bad flags, a missing reference folder, a script under test that failed."""


def build_sd21_from_reference(reference_dir: Path, path: Path, seed: int = 0) -> Path:
    """Save SD2.1 with random weights at `path`: UNet, VAE, text encoder and scheduler from the reference configs.

    The CLIP BPE tokenizer is the small one of the test fixture; the text encoder keeps SD2.1's 49,408-token
    embedding (the tokenizer's ids are a subset), so parameter counts and checkpoint sizes are SD2.1's own.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if not (reference_dir / "unet" / "config.json").is_file():
        raise BenchError(f"no SD2.1 reference configs in {reference_dir}; pass --reference_dir")
    write_clip_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(reference_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(reference_dir / "vae"))
    text_config = json.loads((reference_dir / "text_encoder" / "config.json").read_text())
    text_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(reference_dir / "scheduler"))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def prepare_model(config: str, work_dir: Path, reference_dir: Path) -> Path:
    """The model folder for `config` inside `work_dir`, built on first use and reused afterwards."""
    model_dir = work_dir / f"model-{'tiny' if config == 'tiny' else 'sd21'}"
    if (model_dir / "model_index.json").is_file():
        return model_dir
    partial = work_dir / f"{model_dir.name}.partial"
    print(f"building the {config} model with random weights in {model_dir} ...", flush=True)
    if config == "tiny":
        build_tiny_sd21(partial)
    else:
        build_sd21_from_reference(reference_dir, partial)
    partial.rename(model_dir)
    return model_dir


def prepare_faces(work_dir: Path, resolution: int, count: int) -> Path:
    """A folder of `count` captioned faces at `resolution` pixels (FFHQ layout + metadata.jsonl)."""
    faces = work_dir / f"faces-{resolution}px-{count}"
    if not (faces / "metadata.jsonl").is_file():
        make_face_folder(faces, count=count, size=resolution)
    return faces


def write_random_lora(model_dir: Path, path: Path, seed: int = 0) -> Path:
    """Write a rank-8 LoRA for `model_dir` in the published Text2Face layout, with small random weights.

    Keys: `unet.<module>.lora_{A,B}.weight` on the attention projections and
    `text_encoder.text_model.encoder.layers.N.self_attn.<proj>.lora_{A,B}.weight`, no alpha entries.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / "text_encoder"))
    targets = [(f"unet.{name}", module) for name, module in unet.named_modules() if name.endswith(UNET_LORA_TARGETS)]
    targets += [
        (f"text_encoder.text_model.{name}", module)
        for name, module in text_encoder.named_modules()
        if name.endswith(TEXT_ENCODER_LORA_TARGETS)
    ]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in targets:
        tensors[f"{name}.lora_A.weight"] = torch.randn(LORA_RANK, module.in_features, generator=generator) * 0.01
        tensors[f"{name}.lora_B.weight"] = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def folder_bytes(path: Path) -> int:
    """Bytes on disk of every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cuda_memory_used_bytes() -> int:
    """Memory in use on GPU 0 as nvidia-smi sees it (all processes, CUDA contexts included)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0]) * 2**20


class CheckpointWatch:
    """When each checkpoint-N was written, seen from outside the trainer.

    A thread polls `output_dir` every 20 ms: writing starts when the first entry named `checkpoint-N...`
    appears (a temporary `checkpoint-N.tmp` counts) and ends at the newest file modification inside the
    finished `checkpoint-N` folder. Wall-clock (time.time) on both sides, like file modification times.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.started: dict[int, float] = {}

    def poll(self):
        if self.output_dir.is_dir():
            for entry in os.listdir(self.output_dir):
                match = CHECKPOINT_NAME.match(entry)
                if match:
                    self.started.setdefault(int(match.group(1)), time.time())

    def spans(self) -> dict[int, tuple[float, float]]:
        """{step: (start, end)} of every finished checkpoint folder."""
        spans = {}
        for folder in self.output_dir.glob("checkpoint-*"):
            match = CHECKPOINT_NAME.fullmatch(folder.name)
            files = [f for f in folder.rglob("*") if f.is_file()]
            if match and files:
                step = int(match.group(1))
                end = max(f.stat().st_mtime for f in files)
                # A checkpoint written and renamed between two polls is first seen after its last write.
                spans[step] = (min(self.started.get(step, end), end), end)
        return spans


def tree_cpu_seconds(root: int) -> dict[int, float]:
    """User + system CPU seconds used so far by process `root` and each of its live descendants, read from /proc."""
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                # Fields after the ")" that ends the command name: state, ppid, ..., utime (12th), stime (13th).
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return {pid: cpu[pid] for pid in tree if pid in cpu}


@dataclass
class RunResult:
    """What run_measured saw of one process."""

    launched: float  # time.time() at launch, comparable with checkpoint times
    ended: float  # time.time() when it had exited
    checkpoints: dict[int, tuple[float, float]]  # step -> (start, end) of writing it, wall clock
    cpu_samples: list[tuple[float, float]]  # (time.time(), CPU seconds of the process tree so far), every 0.1 s
    peak_rss_bytes: int  # resident set of the process tree's biggest process at its peak
    peak_cuda_bytes: int | None  # peak GPU memory above the idle level, None without CUDA

    def cpu_seconds_at(self, moment: float) -> float:
        """CPU seconds the process tree had used at `moment` (the last sample before it)."""
        times = [t for t, _ in self.cpu_samples]
        return self.cpu_samples[max(0, bisect.bisect_right(times, moment) - 1)][1]


def run_measured(command: list[str], env: dict, log_path: Path, output_dir: Path | None = None) -> RunResult:
    """Run `command` to completion, its output to `log_path`; return when it was launched, when it wrote each
    checkpoint into `output_dir` (if given), its peak RSS and its peak GPU memory.

    Peak RSS comes from wait4's rusage, which covers the child and the descendants it waited for
    (`accelerate launch` waits for the training process). The poller samples the tree's CPU time every
    0.1 s, which other processes on a shared CPU change less than wall time; on CUDA it reads
    nvidia-smi every 0.2 s.
    """
    poll_cuda = torch.cuda.is_available()
    idle_cuda = cuda_memory_used_bytes() if poll_cuda else 0
    peak_cuda = idle_cuda
    watch = CheckpointWatch(output_dir) if output_dir is not None else None
    finished = threading.Event()
    cpu_samples = []
    cpu_seen = {}  # pid -> CPU seconds when last seen: a process that exits keeps counting what it used

    def poll():
        nonlocal peak_cuda
        tick = 0
        while not finished.wait(0.02):
            if watch is not None:
                watch.poll()
            tick += 1
            if tick % 5 == 0:
                cpu_seen.update(tree_cpu_seconds(process.pid))
                cpu_samples.append((time.time(), sum(cpu_seen.values())))
            if poll_cuda and tick % 10 == 0:
                peak_cuda = max(peak_cuda, cuda_memory_used_bytes())

    poller = threading.Thread(target=poll, daemon=True)
    with open(log_path, "w") as log:
        launched = time.time()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        poller.start()
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.time()
    finished.set()
    poller.join()
    returncode = process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if returncode != 0:
        script = next((Path(part).name for part in command if str(part).endswith(".py")), command[0])
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-2:])
        raise BenchError(f"{script} exited with {returncode} (full log: {log_path}): {tail}")
    return RunResult(
        launched,
        ended,
        watch.spans() if watch is not None else {},
        cpu_samples,
        usage.ru_maxrss * 1024,
        peak_cuda - idle_cuda if poll_cuda else None,
    )


def subprocess_env() -> dict:
    """The environment for scripts under test: offline (every model is a local folder), quiet tokenizers."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
