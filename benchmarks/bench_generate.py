"""Sampling benchmark: `generate.py` (LoRA fused into the weights) against the original approach (unfused adapters).

Three settings, on one random-weight SD2.1-shaped model, one rank-8 LoRA in the published Text2Face key
layout, the same prompt, seed, size, guidance and empty negative prompt, one image per pipeline call:
    original   benchmarks/baseline_generate.py: unfused adapters, the model's scheduler (DDIM), 50 steps
    fused      generate.py, the model's scheduler, 50 steps
    dpm++ 25   generate.py --scheduler dpm++ --steps 25
    compiled   generate.py --compile, 50 steps (only with this script's --compile flag)
Each runs as its own process, alternating, `--repeats` times. Seconds per image is the time both scripts
print for loading the LoRA and sampling `--num_images` images, divided by the number of images: model
loading and process start-up are excluded (generate.py's time also includes fusing the LoRA, and leaves out the
compile time that `--compile` prints apart).
CPU seconds per image are the CPU time the process used over that same stretch of wall time (the last
X seconds before it exited; writing the PNGs and exiting take a fraction of a second): on a CPU shared
with other work they are steadier than wall time. Peak process memory (and, on CUDA, peak GPU
memory) of each setting is reported alongside.

    python benchmarks/bench_generate.py --config tiny --repeats 1    # seconds: the smoke test
    python benchmarks/bench_generate.py --config small               # SD2.1 at 256 px, ~20 min on 2 CPU cores
    python benchmarks/bench_generate.py --config small --compile     # and generate.py --compile beside fused
    python benchmarks/bench_generate.py --config sd21                # SD2.1 at 768 px, fp16, on a GPU

With --sharding it measures instead the fused setting in one process (`python generate.py`) against two
(`accelerate launch --multi_gpu --num_processes 2 generate.py`), each sampling --num_images images of one
prompt, and reports the images/s of both (all images over the time generate.py prints, from the first batch
to the last image of either process) and their ratio. On a CPU host the two processes share the cores (half
the threads each), so a ratio near 1 shows that sharding costs nothing; on two GPUs it shows the scaling:

    python benchmarks/bench_generate.py --config tiny --sharding --num_images 16
    python benchmarks/bench_generate.py --config sd21 --sharding --num_images 32   # on a host with 2 GPUs

The last line printed is one JSON object:
    {"fused_speedup": original s/image over fused s/image, "dpmpp25_speedup": original s/image over
     dpm++ 25-step s/image, ..., "compile_speedup": fused s/image over compiled s/image (with --compile),
     "figures": {...}}
or with --sharding {"sharding_ratio": images/s of 2 processes over 1, "figures": {...}}.
"""

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from statistics import median

from bench_common import (
    CONFIG_RESOLUTIONS,
    DEFAULT_REFERENCE_DIR,
    REPO,
    BenchError,
    prepare_model,
    run_measured,
    subprocess_env,
    write_random_lora,
)
from tqdm.auto import tqdm

PROMPT = "A happy 55 year old male with blond hair and a goatee smiles with visible teeth."
SEED = 42
DEFAULT_NUM_IMAGES = {"tiny": 2, "small": 1, "sd21": 4}
# setting -> (script, extra flags); the original approach is the reference row.
SETTINGS = {
    "original": ("benchmarks/baseline_generate.py", ["--steps", "50"]),
    "fused": ("generate.py", ["--steps", "50"]),
    "dpm++ 25": ("generate.py", ["--steps", "25", "--scheduler", "dpm++"]),
}
COMPILED_SETTING = {"compiled": ("generate.py", ["--steps", "50", "--compile"])}
TIMING_LINE = re.compile(r"(\d+) image\(s\) in ([\d.]+) s")  # printed by generate.py and the baseline
PROCESS_COUNTS = [1, 2]  # the --sharding rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark generate.py against the original unfused-LoRA sampler.")
    parser.add_argument(
        "--config",
        choices=sorted(CONFIG_RESOLUTIONS),
        default="small",
        help="tiny: the test fixture; small: SD2.1 architecture at 256 px; sd21: at 768 px (GPU).",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image height and width in pixels (default: 64 tiny, 256 small, 768 sd21).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repetitions; figures are medians.")
    parser.add_argument(
        "--num_images",
        type=int,
        default=None,
        help="Images per run, one per pipeline call (default: 2 tiny, 1 small, 4 sd21).",
    )
    parser.add_argument("--compile", action="store_true", help="Also run generate.py --compile (the 'compiled' row).")
    parser.add_argument(
        "--sharding",
        action="store_true",
        help="Measure generate.py (fused) in 1 process against 2 under accelerate launch, instead of the settings.",
    )
    parser.add_argument(
        "--threads_per_process",
        type=int,
        default=None,
        help="CPU threads of each generate.py process with --sharding (default: the cores split between them; "
        "on a CPU shared with other work, 1 avoids the stalls of threads waiting for each other).",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda.")
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp16", "bf16", "fp32"],
        default="auto",
        help="Weight precision for every setting; auto is fp16 on cuda and fp32 elsewhere.",
    )
    parser.add_argument(
        "--reference_dir",
        type=Path,
        default=DEFAULT_REFERENCE_DIR,
        help="SD2.1 component configs (small and sd21 configs).",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="Keep the built model, LoRA, images and logs here and reuse them (default: a temp folder).",
    )
    args = parser.parse_args(argv)
    args.resolution = args.resolution or CONFIG_RESOLUTIONS[args.config]
    args.num_images = args.num_images or DEFAULT_NUM_IMAGES[args.config]
    if args.resolution % 8 or args.resolution < 8:
        parser.error("--resolution must be a positive multiple of 8")
    if args.repeats < 1 or args.num_images < 1:
        parser.error("--repeats and --num_images must be at least 1")
    return args


def setting_command(setting: str, args, model_dir: Path, lora: Path, output_dir: Path) -> list[str]:
    script, flags = {**SETTINGS, **COMPILED_SETTING}[setting]
    return [
        sys.executable,
        str(REPO / script),
        "--base_model",
        str(model_dir),
        "--lora",
        str(lora),
        "--prompt",
        PROMPT,
        "--seed",
        str(SEED),
        "--num_images",
        str(args.num_images),
        "--height",
        str(args.resolution),
        "--width",
        str(args.resolution),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--output_dir",
        str(output_dir),
    ] + flags


def sampling_time(log: str, setting: str) -> tuple[int, float]:
    """(images, seconds) from the script's "N image(s) in X s" line."""
    matches = TIMING_LINE.findall(log)
    if not matches:
        raise BenchError(f"the {setting} run printed no 'N image(s) in X s' line")
    count, seconds = int(matches[-1][0]), float(matches[-1][1])
    if seconds <= 0:
        raise BenchError(f"the {setting} run was too fast to time at the printed precision: raise --num_images")
    return count, seconds


def measure_settings(args, work_dir: Path, model_dir: Path, lora: Path) -> dict:
    """Run every setting `--repeats` times, rotating the order; return {setting: [measurement, ...]}."""
    env = subprocess_env()
    names = list(SETTINGS) + (list(COMPILED_SETTING) if args.compile else [])
    results = {setting: [] for setting in names}
    plan = [
        (repetition, names[repetition % len(names) :] + names[: repetition % len(names)])
        for repetition in range(args.repeats)
    ]
    progress = tqdm(total=args.repeats * len(names), desc="sampling runs")
    for repetition, order in plan:
        for setting in order:
            output_dir = work_dir / "images" / f"{setting.replace(' ', '')}-{repetition}"
            shutil.rmtree(output_dir, ignore_errors=True)
            log_path = work_dir / "images" / f"{output_dir.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            run = run_measured(setting_command(setting, args, model_dir, lora, output_dir), env, log_path)
            count, seconds = sampling_time(log_path.read_text(errors="replace"), setting)
            # The sampling ends just before the images are written and the process exits.
            cpu_seconds = run.cpu_seconds_at(run.ended) - run.cpu_seconds_at(run.ended - seconds)
            results[setting].append(
                {
                    "s_per_image": seconds / count,
                    "cpu_s_per_image": cpu_seconds / count,
                    "peak_rss_bytes": run.peak_rss_bytes,
                    "peak_cuda_bytes": run.peak_cuda_bytes,
                }
            )
            progress.update(1)
            tqdm.write(
                f"[{repetition + 1}/{args.repeats}] {setting:9s} {seconds / count:8.3f} s/image, "
                f"{cpu_seconds / count:8.3f} CPU s/image, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB"
            )
    progress.close()
    return results


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sharding_run(processes: int, args, model_dir: Path, lora: Path, output_dir: Path) -> tuple[list[str], dict]:
    """(command, environment) of generate.py's fused setting in one process, or under `accelerate launch` in
    `processes` (--multi_gpu also starts several CPU processes, over gloo), each with its CPU threads."""
    generate = setting_command("fused", args, model_dir, lora, output_dir)
    threads = args.threads_per_process or max(1, (os.cpu_count() or processes) // processes)
    env = {**subprocess_env(), "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        return generate, env
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--num_cpu_threads_per_process", str(threads), "--main_process_port", free_port()]
    return [*launcher, *generate[1:]], env


def measure_sharding(args, work_dir: Path, model_dir: Path, lora: Path) -> dict:
    """Run 1 and 2 processes `--repeats` times, alternating; return {processes: [images/s, ...]}."""
    results = {processes: [] for processes in PROCESS_COUNTS}
    progress = tqdm(total=args.repeats * len(PROCESS_COUNTS), desc="sharding runs")
    for repetition in range(args.repeats):
        order = PROCESS_COUNTS if repetition % 2 == 0 else PROCESS_COUNTS[::-1]
        for processes in order:
            output_dir = work_dir / "images" / f"processes{processes}-{repetition}"
            shutil.rmtree(output_dir, ignore_errors=True)
            log_path = work_dir / "images" / f"{output_dir.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            run_measured(*sharding_run(processes, args, model_dir, lora, output_dir), log_path)
            count, seconds = sampling_time(log_path.read_text(errors="replace"), f"{processes}-process")
            if count != args.num_images or len(list(output_dir.glob("*.png"))) != count:
                raise BenchError(f"the {processes}-process run did not write its {args.num_images} images")
            results[processes].append(count / seconds)
            progress.update(1)
            tqdm.write(f"[{repetition + 1}/{args.repeats}] {processes} process(es) {count / seconds:8.3f} images/s")
    progress.close()
    return results


def report_sharding(args, results: dict) -> dict:
    """Print the markdown table of images/s for 1 and 2 processes; return their ratio and the figures."""
    rates = {processes: median(runs) for processes, runs in results.items()}
    print(
        f"\nconfig {args.config}, {args.resolution} px, {args.num_images} image(s) per run, median of {args.repeats}\n"
    )
    print("| processes | images/s | s/image | images/s over 1 process | per process |")
    print("|--:|--:|--:|--:|--:|")
    for processes, rate in rates.items():
        print(
            f"| {processes} | {rate:.4g} | {1 / rate:.4g} | {rate / rates[1]:.3f} | {rate / rates[1] / processes:.3f} |"
        )
    return {
        "sharding_ratio": rates[2] / rates[1],
        "figures": {f"{p}_process_images_per_s": r for p, r in rates.items()},
    }


def summarize(runs: list[dict]) -> dict:
    figures = {key: median(run[key] for run in runs) for key in ("s_per_image", "cpu_s_per_image", "peak_rss_bytes")}
    if runs[0]["peak_cuda_bytes"] is not None:
        figures["peak_cuda_bytes"] = median(run["peak_cuda_bytes"] for run in runs)
    return figures


def report(args, figures: dict) -> dict:
    """Print a markdown table of the figures and return the speed-ups over the original approach."""
    reference = figures["original"]["s_per_image"]
    cpu_reference = figures["original"]["cpu_s_per_image"]
    cuda = "peak_cuda_bytes" in figures["original"]
    print(
        f"\nconfig {args.config}, {args.resolution} px, {args.num_images} image(s) per run, median of {args.repeats}\n"
    )
    print(
        "| setting | s/image | speed-up over original | CPU s/image | CPU speed-up | peak RSS GiB |"
        + (" peak GPU GiB |" if cuda else "")
    )
    print("|---|--:|--:|--:|--:|--:|" + ("--:|" if cuda else ""))
    for setting, f in figures.items():
        print(
            f"| {setting} | {f['s_per_image']:.4g} | {reference / f['s_per_image']:.3f} | "
            f"{f['cpu_s_per_image']:.4g} | {cpu_reference / f['cpu_s_per_image']:.3f} | "
            f"{f['peak_rss_bytes'] / 2**30:.2f} |" + (f" {f['peak_cuda_bytes'] / 2**30:.2f} |" if cuda else "")
        )
    compiled = (
        {
            "compile_speedup": figures["fused"]["s_per_image"] / figures["compiled"]["s_per_image"],
            "compile_cpu_speedup": figures["fused"]["cpu_s_per_image"] / figures["compiled"]["cpu_s_per_image"],
        }
        if "compiled" in figures
        else {}
    )
    return {
        **compiled,
        "fused_speedup": reference / figures["fused"]["s_per_image"],
        "dpmpp25_speedup": reference / figures["dpm++ 25"]["s_per_image"],
        # On a CPU shared with other work, CPU time per image is the steadier measure of the same speed-ups.
        "fused_cpu_speedup": cpu_reference / figures["fused"]["cpu_s_per_image"],
        "dpmpp25_cpu_speedup": cpu_reference / figures["dpm++ 25"]["cpu_s_per_image"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="t2f-bench-generate-"))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        if not (REPO / "generate.py").is_file():
            raise BenchError(f"no generate.py in {REPO}: nothing to benchmark against the baseline")
        model_dir = prepare_model(args.config, work_dir, args.reference_dir)
        lora = write_random_lora(model_dir, work_dir / "lora" / "pytorch_lora_weights.safetensors")
        if args.sharding:
            ratios = report_sharding(args, measure_sharding(args, work_dir, model_dir, lora))
        else:
            results = measure_settings(args, work_dir, model_dir, lora)
            figures = {setting: summarize(runs) for setting, runs in results.items()}
            ratios = {**report(args, figures), "figures": figures}
    except BenchError as error:
        print(f"bench_generate: {error}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                **ratios,
                "config": args.config,
                "resolution": args.resolution,
                "repeats": args.repeats,
                "num_images": args.num_images,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
