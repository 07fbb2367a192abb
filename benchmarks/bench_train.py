"""Training benchmark: this project's `finetune_lora.py` against the original loop, same model, data and settings.

Both trainers run as real `accelerate launch` processes, alternating, on one random-weight SD2.1-shaped
model and one folder of captioned faces, LoRA rank 8 on the UNet and the text encoder, batch size 1,
center crop. Ours caches the VAE latents (`--cache_latents`) and writes LoRA-only checkpoints; the
baseline (`benchmarks/baseline_train.py`) VAE-encodes every batch and saves the full accelerate state.

Method. Each trainer runs 2K optimizer steps with a checkpoint every K steps (`--checkpointing_steps`), no
validation. From outside, the benchmark sees when each checkpoint starts (its folder, or temporary folder,
appears in the output directory) and ends (the last file written into it). The K steps between the end of
checkpoint K and the start of checkpoint 2K are pure training, past the first step's warm-up:
    steady steps/s = K / (start of checkpoint 2K - end of checkpoint K)
The CPU seconds the training process used over the same K steps are reported too: on a CPU shared with
other work they are steadier than wall time. Checkpoint time (mean of the two) and start-up (launch to
checkpoint K, less K steps at the steady rate: imports, model loading, latent caching, first-step warm-up;
also in CPU seconds) are reported separately. Peak memory is the resident set of the training process
(wait4 rusage over the whole run, checkpoints included) and, on CUDA, the GPU memory nvidia-smi reports
above the idle level. Figures are medians over `--repeats` repetitions, the trainers' order alternating.

    python benchmarks/bench_train.py --config tiny --repeats 1     # seconds: the smoke test
    python benchmarks/bench_train.py --config small                # SD2.1 at 256 px, ~11 min on 2 CPU cores
    python benchmarks/bench_train.py --config sd21 --mixed_precision fp16   # SD2.1 at 768 px, on a GPU

The last line printed is one JSON object:
    {"train_speedup": ours/baseline steady steps/s, "checkpoint_size_ratio": ours/baseline bytes,
     "peak_memory_ratio": ours/baseline peak RSS, ..., "figures": {...}}
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

from bench_common import (
    CONFIG_RESOLUTIONS,
    DEFAULT_REFERENCE_DIR,
    LORA_RANK,
    REPO,
    BenchError,
    folder_bytes,
    prepare_faces,
    prepare_model,
    run_measured,
    subprocess_env,
)
from tqdm.auto import tqdm

TRAINERS = ("baseline", "ours")
DEFAULT_CHECKPOINTING_STEPS = {"tiny": 60, "small": 4, "sd21": 20}  # K: each run trains 2K steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark finetune_lora.py against the original training loop.")
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
        help="Training resolution in pixels (default: 64 tiny, 256 small, 768 sd21).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repetitions; figures are medians.")
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="K: checkpoint every K steps, train 2K, time the second K (default: 60 tiny, 4 small, 20 sd21).",
    )
    parser.add_argument("--train_batch_size", type=int, default=1, help="Images per optimizer step, both trainers.")
    parser.add_argument("--num_faces", type=int, default=8, help="Images in the generated training folder.")
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="UNet LoRA learning rate (the baseline's single rate for both models).",
    )
    parser.add_argument(
        "--learning_rate_text_encoder",
        type=float,
        default=5e-5,
        help="Text-encoder LoRA learning rate of finetune_lora.py.",
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="Passed to `accelerate launch` for both trainers.",
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
        help="Keep the built model, faces and logs here and reuse them (default: a temp folder).",
    )
    args = parser.parse_args(argv)
    args.resolution = args.resolution or CONFIG_RESOLUTIONS[args.config]
    args.checkpointing_steps = args.checkpointing_steps or DEFAULT_CHECKPOINTING_STEPS[args.config]
    if args.repeats < 1 or args.checkpointing_steps < 1:
        parser.error("--repeats and --checkpointing_steps must be at least 1")
    return args


def trainer_command(
    trainer: str, args, model_dir: Path, faces: Path, output_dir: Path, steps: int, checkpointing_steps: int
) -> list[str]:
    """The `accelerate launch` command line of one run; the settings both trainers share come first."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        args.mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    shared = [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--train_data_dir",
        str(faces),
        "--resolution",
        str(args.resolution),
        "--center_crop",
        "--train_batch_size",
        str(args.train_batch_size),
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(checkpointing_steps),
        "--rank",
        str(LORA_RANK),
        "--text_encoder_rank",
        str(LORA_RANK),
        "--learning_rate",
        str(args.learning_rate),
        "--output_dir",
        str(output_dir),
        "--seed",
        "0",
    ]
    if trainer == "baseline":
        return launch + [str(REPO / "benchmarks" / "baseline_train.py")] + shared
    return (
        launch
        + [str(REPO / "finetune_lora.py")]
        + shared
        + [
            "--train_text_encoder",
            "--cache_latents",
            "--learning_rate_text_encoder",
            str(args.learning_rate_text_encoder),
            "--report_to",
            "none",
            "--validation_prompts",  # the baseline samples none
            "none",
        ]
    )


def measure_runs(args, work_dir: Path, model_dir: Path, faces: Path) -> dict:
    """One run per trainer per repetition, the order alternating; return {trainer: [figures of each run]}."""
    steps = 2 * args.checkpointing_steps
    results = {trainer: [] for trainer in TRAINERS}
    plan = [
        (repetition, trainer)
        for repetition in range(args.repeats)
        for trainer in (TRAINERS if repetition % 2 == 0 else TRAINERS[::-1])
    ]
    for repetition, trainer in tqdm(plan, desc="training runs"):
        run_dir = work_dir / "runs" / f"{trainer}-{repetition}"
        output_dir = run_dir / "output"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        command = trainer_command(trainer, args, model_dir, faces, output_dir, steps, args.checkpointing_steps)
        # A fresh `datasets` cache per run, so that no run inherits another's prepared imagefolder.
        env = {**subprocess_env(), "HF_DATASETS_CACHE": str(run_dir / "datasets-cache")}
        run = run_measured(command, env, run_dir.with_suffix(".log"), output_dir)
        figures = run_figures(args, trainer, run, output_dir)
        results[trainer].append(figures)
        tqdm.write(
            f"[{repetition + 1}/{args.repeats}] {trainer:8s} {figures['steps_per_s']:.4g} steps/s, "
            f"{figures['cpu_s_per_step']:.3g} CPU s/step, "
            f"start-up {figures['startup_s']:.1f} s, checkpoint {figures['checkpoint_s']:.2f} s, "
            f"peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB"
        )
        shutil.rmtree(run_dir)  # a full baseline checkpoint of SD2.1 is ~5 GB
    return results


def run_figures(args, trainer: str, run, output_dir: Path) -> dict:
    """Steady steps/s, start-up, checkpoint time and size, peak memory of one run (see the module docstring)."""
    k = args.checkpointing_steps
    if sorted(run.checkpoints) != [k, 2 * k]:
        raise BenchError(
            f"{trainer} wrote checkpoints {sorted(run.checkpoints)} in {output_dir}, expected {[k, 2 * k]}"
        )
    (first_start, first_end), (second_start, second_end) = run.checkpoints[k], run.checkpoints[2 * k]
    if second_start <= first_end:
        raise BenchError(f"{trainer}: checkpoint {2 * k} started before checkpoint {k} ended; is the clock off?")
    steps_per_s = k / (second_start - first_end)
    cpu_s_per_step = (run.cpu_seconds_at(second_start) - run.cpu_seconds_at(first_end)) / k
    figures = {
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * args.train_batch_size,
        "cpu_s_per_step": cpu_s_per_step,
        "startup_s": (first_start - run.launched) - k / steps_per_s,
        "startup_cpu_s": run.cpu_seconds_at(first_start) - k * cpu_s_per_step,
        "checkpoint_s": ((first_end - first_start) + (second_end - second_start)) / 2,
        "checkpoint_bytes": folder_bytes(output_dir / f"checkpoint-{k}"),
        "peak_rss_bytes": run.peak_rss_bytes,
    }
    if run.peak_cuda_bytes is not None:
        figures["peak_cuda_bytes"] = run.peak_cuda_bytes
    return figures


def summarize(runs: list[dict]) -> dict:
    """Median of each figure over the repetitions of one trainer."""
    return {key: median(run[key] for run in runs) for key in runs[0]}


def report(args, figures: dict) -> dict:
    """Print a markdown table of the figures and return the ratios ours/baseline."""
    ours, base = figures["ours"], figures["baseline"]
    print(
        f"\nconfig {args.config}, {args.resolution} px, batch {args.train_batch_size}, checkpoint every "
        f"{args.checkpointing_steps} of {2 * args.checkpointing_steps} steps of {args.repeats}, "
        f"mixed precision {args.mixed_precision}\n"
    )
    print(
        "| trainer | steps/s | images/s | CPU s/step | start-up s | start-up CPU s | checkpoint s "
        "| MB per checkpoint | peak RSS GiB |" + (" peak GPU GiB |" if "peak_cuda_bytes" in ours else "")
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if "peak_cuda_bytes" in ours else ""))
    for name, f in (("baseline", base), ("finetune_lora.py", ours)):
        print(
            f"| {name} | {f['steps_per_s']:.4g} | {f['images_per_s']:.4g} | {f['cpu_s_per_step']:.3g} | "
            f"{f['startup_s']:.1f} | {f['startup_cpu_s']:.1f} | {f['checkpoint_s']:.2f} | "
            f"{f['checkpoint_bytes'] / 1e6:.1f} | {f['peak_rss_bytes'] / 2**30:.2f} |"
            + (f" {f['peak_cuda_bytes'] / 2**30:.2f} |" if "peak_cuda_bytes" in f else "")
        )
    ratios = {
        "train_speedup": ours["steps_per_s"] / base["steps_per_s"],
        # On a CPU shared with other work, CPU time per step is the steadier measure of the same speed-up.
        "train_cpu_speedup": base["cpu_s_per_step"] / ours["cpu_s_per_step"],
        "checkpoint_size_ratio": ours["checkpoint_bytes"] / base["checkpoint_bytes"],
        "peak_memory_ratio": ours["peak_rss_bytes"] / base["peak_rss_bytes"],
    }
    if "peak_cuda_bytes" in ours:
        ratios["peak_cuda_memory_ratio"] = ours["peak_cuda_bytes"] / base["peak_cuda_bytes"]
    return ratios


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="t2f-bench-train-"))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        if not (REPO / "finetune_lora.py").is_file():
            raise BenchError(f"no finetune_lora.py in {REPO}: nothing to benchmark against the baseline")
        model_dir = prepare_model(args.config, work_dir, args.reference_dir)
        faces = prepare_faces(work_dir, args.resolution, args.num_faces)
        results = measure_runs(args, work_dir, model_dir, faces)
        figures = {trainer: summarize(results[trainer]) for trainer in TRAINERS}
        ratios = report(args, figures)
    except BenchError as error:
        print(f"bench_train: {error}", file=sys.stderr)
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
                "checkpointing_steps": args.checkpointing_steps,
                "figures": figures,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
