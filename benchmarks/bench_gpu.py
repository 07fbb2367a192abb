"""How fast `generate.py` and `finetune_lora.py` run against the chip's own limit, eager and `--compile`.

One command for a CUDA machine. It builds SD2.1 with random weights from the reference configs (compute and
memory are the real model's; see bench_common.py), then runs the real scripts as processes, each mode in turn:
    cold start        launch of `generate.py` to its first PNG on disk (imports, loading, fusing, compiling)
    compile           the compile time `generate.py --compile` prints (its 2-step warm-up batch)
    s/image, batch 1  steady: from the first PNG to the last of --num_images images, over the images after the first
    images/s, batch B steady: from the end of the first batch to the last PNG, at each --batch_sizes value; the best
    training images/s `finetune_lora.py --cache_latents --train_text_encoder` (rank 8) at --train_batch_size, bf16
                      on CUDA: K steps timed between checkpoint K and checkpoint 2K, seen from outside (bench_train.py)
Each speed is also given as a percentage of the chip's peak: the FLOP of the work (counted once with
torch.utils.flop_counter.FlopCounterMode on meta tensors: per image, 2 text-encoder passes, --steps UNet passes
on the guidance pair and one VAE decode; per training image, the forward and backward of the UNet and the text
encoder with their LoRAs, the latents being cached) over the FLOP/s of a one-second 8192^3 bf16 matmul probe
(on the CPU, 1024^3 fp32: the precision the CPU runs in). Peak GPU memory (nvidia-smi, above idle) and peak
host memory (the process tree's peak resident set) are given for the sampling and the training runs of each mode.

    python benchmarks/bench_gpu.py --config sd21     # one H100/H200-class GPU, 768 px, fp16 sampling
    python benchmarks/bench_gpu.py --config sd21 --modes eager     # a mode per call: each fits in ten minutes
    python benchmarks/bench_gpu.py --config tiny     # the test fixture on the CPU, the smoke test

The last line printed is one JSON object: {"config": ..., "peak_tflops": ..., "eager": {figures},
"compile": {figures}, "compile_speedup": {figure: compiled over eager, when both modes ran}, ...}.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    CONFIG_RESOLUTIONS,
    DEFAULT_REFERENCE_DIR,
    LORA_RANK,
    REPO,
    TEXT_ENCODER_LORA_TARGETS,
    UNET_LORA_TARGETS,
    BenchError,
    prepare_faces,
    prepare_model,
    run_measured,
    subprocess_env,
    write_random_lora,
)

PROMPT = "A happy 55 year old male with blond hair and a goatee smiles with visible teeth."
MODES = ("eager", "compile")
COMPILED_LINE = re.compile(r"compiled the UNet and the VAE decoder in ([\d.]+) s")
# config -> defaults: sampling steps, batch-1 images, batch sizes tried, training batch, K, training faces. tiny's
# shapes are those of tests/test_compile.py, so that a test run compiles each graph once (Inductor caches it on disk).
DEFAULTS = {
    "tiny": {"steps": 3, "num_images": 3, "batch_sizes": [1], "train_batch_size": 2, "k": 2, "faces": 8},
    "small": {"steps": 50, "num_images": 3, "batch_sizes": [4], "train_batch_size": 4, "k": 2, "faces": 8},
    "sd21": {"steps": 50, "num_images": 5, "batch_sizes": [8], "train_batch_size": 16, "k": 10, "faces": 32},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark generate.py and finetune_lora.py, eager and --compile, against the chip's peak.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", choices=sorted(DEFAULTS), default="sd21", help="Model and resolution.")
    parser.add_argument("--steps", type=int, help="Sampling steps (default: 50; 3 for tiny).")
    parser.add_argument("--num_images", type=int, help="Images of the batch-1 run (default: 5 sd21, 3 otherwise).")
    parser.add_argument(
        "--batch_sizes", type=int, nargs="+", help="Batch sizes tried for images/s (default: 8; 1 for tiny)."
    )
    parser.add_argument("--train_batch_size", type=int, help="Training batch size (default: 16 sd21).")
    parser.add_argument("--parts", nargs="+", choices=["generate", "train"], default=["generate", "train"])
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="Eager, --compile or both (one per call fits)."
    )
    parser.add_argument("--reference_dir", type=Path, default=DEFAULT_REFERENCE_DIR, help="SD2.1 component configs.")
    parser.add_argument("--work_dir", type=Path, help="Keep the model, images and logs here (default: a temp folder).")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.config].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.resolution = CONFIG_RESOLUTIONS[args.config]
    if args.num_images < 2 or min(args.batch_sizes) < 1 or args.steps < 1 or args.train_batch_size < 1:
        parser.error("--num_images must be at least 2 (the first image is not timed); the others at least 1")
    return args


def matmul_peak_flops(device: torch.device) -> float:
    """FLOP/s of a dense matmul kept busy for about a second: 8192^3 in bf16 on CUDA, 1024^3 in fp32 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: cuBLAS handle, kernel choice
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        for _ in range(10):
            torch.matmul(a, b, out=out)
        synchronize(device)
        count += 10
    return 2 * n**3 * count / (time.perf_counter() - start)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meta_models(model_dir: Path, lora: bool):
    """The UNet, VAE and text encoder of `model_dir` on the meta device (shapes only), with rank-8 LoRAs if asked."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae"))
        config = CLIPTextConfig.from_pretrained(model_dir / "text_encoder")
        config._attn_implementation = "sdpa"
        text_encoder = CLIPTextModel(config)
        for model in (unet, vae, text_encoder):
            model.requires_grad_(False)
        if lora:
            unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(UNET_LORA_TARGETS)))
            text_encoder.add_adapter(
                LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(TEXT_ENCODER_LORA_TARGETS))
            )
    return unet, vae, text_encoder


def counted_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def generation_flops(model_dir: Path, resolution: int, steps: int) -> float:
    """FLOP of one image with guidance: 2 text-encoder passes, `steps` UNet passes on the pair, 1 VAE decode."""
    unet, vae, text_encoder = meta_models(model_dir, lora=False)  # the LoRA is fused: the base model's cost
    latent = resolution // 8
    with torch.no_grad(), torch.device("meta"):
        tokens = torch.zeros(2, 77, dtype=torch.long)
        context = torch.zeros(2, 77, unet.config.cross_attention_dim)
        latents = torch.zeros(2, unet.config.in_channels, latent, latent)
        flops = counted_flops(lambda: text_encoder(tokens))
        flops += steps * counted_flops(lambda: unet(latents, torch.tensor(999), context))
        flops += counted_flops(lambda: vae.decode(latents[:1]))
    return flops


def training_flops_per_image(model_dir: Path, resolution: int, batch_size: int) -> float:
    """FLOP of one training image: forward and backward of the text encoder and the UNet with their LoRAs."""
    unet, _, text_encoder = meta_models(model_dir, lora=True)
    latent = resolution // 8

    def step():
        tokens = torch.zeros(batch_size, 77, dtype=torch.long)
        latents = torch.zeros(batch_size, unet.config.in_channels, latent, latent)
        context = text_encoder(tokens)[0]
        prediction = unet(latents, torch.zeros(batch_size, dtype=torch.long), context).sample
        prediction.float().square().mean().backward()

    return counted_flops(step) / batch_size


def generation_command(args, mode: str, model_dir: Path, lora: Path, output: Path, num_images: int, batch: int):
    command = [sys.executable, str(REPO / "generate.py"), "--base_model", str(model_dir), "--lora", str(lora)]
    command += ["--prompt", PROMPT, "--num_images", str(num_images), "--batch_size", str(batch)]
    command += ["--steps", str(args.steps), "--height", str(args.resolution), "--width", str(args.resolution)]
    return command + ["--output_dir", str(output)] + (["--compile"] if mode == "compile" else [])


def measure_generation(args, mode: str, model_dir: Path, lora: Path, work_dir: Path, batch: int) -> dict:
    """One generate.py run at `batch`; the batch-1 run also gives the cold start."""
    num_images = args.num_images if batch == 1 else 3 * batch  # three batches: the first is not timed
    output = work_dir / "images" / f"{mode}-batch{batch}"
    shutil.rmtree(output, ignore_errors=True)
    log = output.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    run = run_measured(generation_command(args, mode, model_dir, lora, output, num_images, batch), ENV, log)
    written = sorted(png.stat().st_mtime for png in output.glob("*.png"))
    if len(written) != num_images:
        raise BenchError(f"generate.py wrote {len(written)} of {num_images} images into {output}")
    span = written[-1] - written[batch - 1]
    if span <= 0:
        raise BenchError(f"the {mode} batch-{batch} run was too fast to time: raise --num_images")
    compiled = COMPILED_LINE.findall(log.read_text(errors="replace"))
    return {
        "cold_start_s": written[0] - run.launched,
        "compile_s": float(compiled[-1]) if compiled else 0.0,
        "images_per_s": (num_images - batch) / span,
        "peak_gpu_bytes": run.peak_cuda_bytes,
        "peak_host_bytes": run.peak_rss_bytes,
    }


def measure_training(args, mode: str, model_dir: Path, faces: Path, work_dir: Path) -> dict:
    """Steady training images/s between checkpoint K and checkpoint 2K, and the start-up before them."""
    k = DEFAULTS[args.config]["k"]
    output = work_dir / "runs" / mode
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "bf16" if torch.cuda.is_available() else "no", "--dynamo_backend", "no"]
    command += [str(REPO / "finetune_lora.py"), "--pretrained_model_name_or_path", str(model_dir)]
    command += ["--train_data_dir", str(faces), "--resolution", str(args.resolution), "--center_crop"]
    command += ["--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(2 * k)]
    command += ["--checkpointing_steps", str(k), "--rank", str(LORA_RANK), "--text_encoder_rank", str(LORA_RANK)]
    command += ["--train_text_encoder", "--cache_latents", "--report_to", "none", "--output_dir", str(output)]
    command += ["--validation_prompts", "none"]  # a grid after checkpoint K would fall inside the timed steps
    command += ["--compile"] if mode == "compile" else []
    output.parent.mkdir(parents=True, exist_ok=True)
    run = run_measured(command, ENV, output.with_suffix(".log"), output)
    if sorted(run.checkpoints) != [k, 2 * k]:
        raise BenchError(f"finetune_lora.py wrote checkpoints {sorted(run.checkpoints)}, expected {[k, 2 * k]}")
    (first_start, first_end), (second_start, _) = run.checkpoints[k], run.checkpoints[2 * k]
    steps_per_s = k / (second_start - first_end)
    shutil.rmtree(output)
    return {
        "train_images_per_s": steps_per_s * args.train_batch_size,
        "train_startup_s": first_start - run.launched - k / steps_per_s,
        "train_peak_gpu_bytes": run.peak_cuda_bytes,
        "train_peak_host_bytes": run.peak_rss_bytes,
    }


def measure_mode(args, mode: str, model_dir: Path, lora: Path, faces: Path, work_dir: Path, flops: dict) -> dict:
    figures = {}
    if "generate" in args.parts:
        single = measure_generation(args, mode, model_dir, lora, work_dir, 1)
        batched = {
            batch: single if batch == 1 else measure_generation(args, mode, model_dir, lora, work_dir, batch)
            for batch in args.batch_sizes
        }
        best = max(batched, key=lambda batch: batched[batch]["images_per_s"])
        figures |= {
            "cold_start_s": single["cold_start_s"],
            "compile_s": single["compile_s"],
            "s_per_image": 1 / single["images_per_s"],
            "best_batch": best,
            "images_per_s": batched[best]["images_per_s"],
            "images_per_s_by_batch": {batch: run["images_per_s"] for batch, run in batched.items()},
            "peak_gpu_bytes": max_or_none(run["peak_gpu_bytes"] for run in [single, *batched.values()]),
            "peak_host_bytes": max(run["peak_host_bytes"] for run in [single, *batched.values()]),
        }
        figures["single_peak_percent"] = 100 * flops["image"] / figures["s_per_image"] / flops["peak"]
        figures["batched_peak_percent"] = 100 * flops["image"] * figures["images_per_s"] / flops["peak"]
    if "train" in args.parts:
        figures |= measure_training(args, mode, model_dir, faces, work_dir)
        figures["train_peak_percent"] = 100 * flops["train_image"] * figures["train_images_per_s"] / flops["peak"]
    print(f"{mode}: {json.dumps(figures)}", flush=True)  # all of them, should a later mode not finish
    return figures


def max_or_none(values):
    values = list(values)
    return None if None in values else max(values)


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def report(args, figures: dict, flops: dict):
    """A markdown table, the modes run side by side."""
    rows = []
    if "generate" in args.parts:
        rows += [
            ("cold start, launch to first image (s)", "cold_start_s", "{:.1f}"),
            ("compile time (s)", "compile_s", "{:.1f}"),
            (f"s/image at batch 1, {args.steps} steps with guidance", "s_per_image", "{:.3f}"),
            ("  % of peak", "single_peak_percent", "{:.1f}"),
            ("images/s at the best batch", "images_per_s", "{:.3f}"),
            ("  best batch", "best_batch", "{}"),
            ("  % of peak", "batched_peak_percent", "{:.1f}"),
            ("sampling peak GPU memory (GiB)", "peak_gpu_bytes", None),
            ("sampling peak host memory (GiB)", "peak_host_bytes", None),
        ]
    if "train" in args.parts:
        rows += [
            (f"training images/s at batch {args.train_batch_size}", "train_images_per_s", "{:.2f}"),
            ("  % of peak", "train_peak_percent", "{:.1f}"),
            ("training start-up before the timed steps (s)", "train_startup_s", "{:.1f}"),
            ("training peak GPU memory (GiB)", "train_peak_gpu_bytes", None),
            ("training peak host memory (GiB)", "train_peak_host_bytes", None),
        ]
    print(
        f"\nconfig {args.config}, {args.resolution} px, device {DEVICE}, peak {flops['peak'] / 1e12:.3g} TFLOP/s, "
        f"{flops['image'] / 1e12:.4g} TFLOP per image, {flops['train_image'] / 1e12:.4g} TFLOP per training image\n"
    )
    print("| figure | " + " | ".join(f"--{m}" if m == "compile" else m for m in args.modes) + " |")
    print("|---|" + "--:|" * len(args.modes))
    for label, key, form in rows:
        cells = [gib(figures[m][key]) if form is None else form.format(figures[m][key]) for m in args.modes]
        print(f"| {label} | " + " | ".join(cells) + " |")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ENV = subprocess_env()


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="t2f-bench-gpu-"))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        model_dir = prepare_model(args.config, work_dir, args.reference_dir)
        lora = write_random_lora(model_dir, work_dir / "lora" / "pytorch_lora_weights.safetensors")
        faces = prepare_faces(work_dir, args.resolution, DEFAULTS[args.config]["faces"])
        flops = {
            "peak": matmul_peak_flops(DEVICE),
            "image": generation_flops(model_dir, args.resolution, args.steps),
            "train_image": training_flops_per_image(model_dir, args.resolution, args.train_batch_size),
        }
        figures = {mode: measure_mode(args, mode, model_dir, lora, faces, work_dir, flops) for mode in args.modes}
        report(args, figures, flops)
    except BenchError as error:
        print(f"bench_gpu: {error}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    speedups = {}
    if len(figures) == len(MODES):
        eager, compiled = figures["eager"], figures["compile"]
        speedups = {key: compiled[key] / eager[key] for key in ("images_per_s", "train_images_per_s") if key in eager}
        if "s_per_image" in eager:
            speedups["s_per_image"] = eager["s_per_image"] / compiled["s_per_image"]
    print(
        json.dumps(
            {
                "config": args.config,
                "resolution": args.resolution,
                "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                "peak_tflops": flops["peak"] / 1e12,
                "tflop_per_image": flops["image"] / 1e12,
                "tflop_per_training_image": flops["train_image"] / 1e12,
                "steps": args.steps,
                "train_batch_size": args.train_batch_size,
                **{mode: figures[mode] for mode in args.modes},
                "compile_speedup": speedups,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
