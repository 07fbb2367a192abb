"""Training benchmark: this project's `finetune_lora.py` against the original loop, same model, data and settings.

Both trainers run as real `accelerate launch` processes, alternating, on one random-weight SD2.1-shaped
model and one folder of captioned faces, LoRA rank 8 on the UNet and the text encoder, batch size 1,
center crop. Ours caches the VAE latents (`--cache_latents`) and writes LoRA-only checkpoints; the
baseline (`benchmarks/baseline_train.py`) VAE-encodes every batch and saves the full accelerate state.

Method. Each trainer runs twice per repetition: a short run of N1 steps without checkpoints and a long
run of N2 steps with one checkpoint at its last step. Start-up (imports, model loading, latent caching),
the final save and the exit cost the same in both, so they cancel in the difference:
    steady steps/s = (N2 - N1) / ((t_long - checkpoint time) - t_short)
Checkpoint time is timed from outside (first checkpoint entry in the output folder to its last file
write) and reported separately, as is start-up = t_short - N1 / (steady steps/s). Neither trainer
runs validation. Peak memory is the resident set of the training process (wait4 rusage) and, on CUDA,
the GPU memory nvidia-smi reports above the idle level. Figures are medians over `--repeats`.

    python benchmarks/bench_train.py --config tiny --repeats 1     # seconds: the smoke test
    python benchmarks/bench_train.py --config small                # SD2.1 at 256 px, ~12 min on 2 CPU cores
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

from tqdm.auto import tqdm

from bench_common import (CONFIG_RESOLUTIONS, DEFAULT_REFERENCE_DIR, LORA_RANK, REPO, BenchError, folder_bytes,
                          median, prepare_faces, prepare_model, run_measured, subprocess_env)

TRAINERS = ("baseline", "ours")
DEFAULT_STEPS = {"tiny": (2, 120), "small": (1, 6), "sd21": (5, 30)}  # (short run, long run) optimizer steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark finetune_lora.py against the original training loop.")
    parser.add_argument("--config", choices=sorted(CONFIG_RESOLUTIONS), default="small",
                        help="tiny: the test fixture; small: SD2.1 architecture at 256 px; sd21: at 768 px (GPU).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Training resolution in pixels (default: 64 tiny, 256 small, 768 sd21).")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repetitions; figures are medians.")
    parser.add_argument("--steps_short", type=int, default=None, help="Steps of the short run (default per config).")
    parser.add_argument("--steps_long", type=int, default=None, help="Steps of the long run (default per config).")
    parser.add_argument("--train_batch_size", type=int, default=1, help="Images per optimizer step, both trainers.")
    parser.add_argument("--num_faces", type=int, default=8, help="Images in the generated training folder.")
    parser.add_argument("--learning_rate", type=float, default=1e-4,
                        help="UNet LoRA learning rate (the baseline's single rate for both models).")
    parser.add_argument("--learning_rate_text_encoder", type=float, default=5e-5,
                        help="Text-encoder LoRA learning rate of finetune_lora.py.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="Passed to `accelerate launch` for both trainers.")
    parser.add_argument("--reference_dir", type=Path, default=DEFAULT_REFERENCE_DIR,
                        help="SD2.1 component configs (small and sd21 configs).")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="Keep the built model, faces and logs here and reuse them (default: a temp folder).")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or CONFIG_RESOLUTIONS[args.config]
    default_short, default_long = DEFAULT_STEPS[args.config]
    args.steps_short = args.steps_short or default_short
    args.steps_long = args.steps_long or default_long
    if not 0 < args.steps_short < args.steps_long:
        parser.error("need 0 < --steps_short < --steps_long")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def trainer_command(trainer: str, args, model_dir: Path, faces: Path, output_dir: Path, steps: int,
                    checkpointing_steps: int) -> list[str]:
    """The `accelerate launch` command line of one run; the settings both trainers share come first."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
    shared = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(faces),
              "--resolution", str(args.resolution), "--center_crop", "--train_batch_size", str(args.train_batch_size),
              "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing_steps),
              "--rank", str(LORA_RANK), "--text_encoder_rank", str(LORA_RANK),
              "--learning_rate", str(args.learning_rate), "--output_dir", str(output_dir), "--seed", "0"]
    if trainer == "baseline":
        return launch + [str(REPO / "benchmarks" / "baseline_train.py")] + shared
    return launch + [str(REPO / "finetune_lora.py")] + shared + [
        "--train_text_encoder", "--cache_latents", "--learning_rate_text_encoder", str(args.learning_rate_text_encoder)]


def run_plan(repeats: int):
    """(repetition, run length, trainer) in alternating order, so drifting machine load hits both trainers."""
    for repetition in range(repeats):
        order = TRAINERS if repetition % 2 == 0 else TRAINERS[::-1]
        for length in ("short", "long"):
            for trainer in order:
                yield repetition, length, trainer


def measure_runs(args, work_dir: Path, model_dir: Path, faces: Path) -> dict:
    """Run every planned training run; return {trainer: [{"short": RunResult, "long": RunResult, bytes}, ...]}."""
    env = {**subprocess_env(), "HF_DATASETS_CACHE": str(work_dir / "datasets-cache")}
    results = {trainer: [{} for _ in range(args.repeats)] for trainer in TRAINERS}
    plan = list(run_plan(args.repeats))
    for repetition, length, trainer in tqdm(plan, desc="training runs"):
        steps = args.steps_short if length == "short" else args.steps_long
        # The short run never reaches a checkpoint; the long one writes exactly one, at its last step.
        checkpointing_steps = args.steps_long + 1 if length == "short" else args.steps_long
        output_dir = work_dir / "runs" / f"{trainer}-{repetition}-{length}"
        shutil.rmtree(output_dir, ignore_errors=True)
        command = trainer_command(trainer, args, model_dir, faces, output_dir, steps, checkpointing_steps)
        run = run_measured(command, env, work_dir / "runs" / f"{output_dir.name}.log", output_dir)
        results[trainer][repetition][length] = run
        if length == "long":
            checkpoint = output_dir / f"checkpoint-{steps}"
            if not checkpoint.is_dir():
                raise BenchError(f"{trainer} wrote no {checkpoint.name} in {output_dir}")
            results[trainer][repetition]["checkpoint_bytes"] = folder_bytes(checkpoint)
        tqdm.write(f"[{repetition + 1}/{args.repeats}] {trainer:8s} {steps:4d} steps: {run.seconds:7.1f} s "
                   f"(checkpoint {run.checkpoint_seconds:.1f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB)")
        shutil.rmtree(output_dir)  # a full baseline checkpoint of SD2.1 is ~5 GB
    return results


def summarize(args, repetitions: list[dict]) -> dict:
    """Median figures of one trainer over its repetitions."""
    steps_per_s, startup_s = [], []
    for rep in repetitions:
        short, long = rep["short"], rep["long"]
        steady_seconds = (long.seconds - long.checkpoint_seconds) - (short.seconds - short.checkpoint_seconds)
        if steady_seconds <= 0:
            raise BenchError(f"the long run was not slower than the short one ({long.seconds:.1f} s vs "
                             f"{short.seconds:.1f} s): raise --steps_long")
        rate = (args.steps_long - args.steps_short) / steady_seconds
        steps_per_s.append(rate)
        startup_s.append(short.seconds - short.checkpoint_seconds - args.steps_short / rate)
    figures = {
        "steps_per_s": median(steps_per_s),
        "images_per_s": median(steps_per_s) * args.train_batch_size,
        "startup_s": median(startup_s),
        "checkpoint_s": median(rep["long"].checkpoint_seconds for rep in repetitions),
        "checkpoint_bytes": median(rep["checkpoint_bytes"] for rep in repetitions),
        "peak_rss_bytes": median(max(rep["short"].peak_rss_bytes, rep["long"].peak_rss_bytes) for rep in repetitions),
    }
    if repetitions[0]["long"].peak_cuda_bytes is not None:
        figures["peak_cuda_bytes"] = median(max(rep["short"].peak_cuda_bytes, rep["long"].peak_cuda_bytes)
                                            for rep in repetitions)
    return figures


def report(args, figures: dict) -> dict:
    """Print a markdown table of the figures and return the ratios ours/baseline."""
    ours, base = figures["ours"], figures["baseline"]
    print(f"\nconfig {args.config}, {args.resolution} px, batch {args.train_batch_size}, steps {args.steps_short}"
          f"/{args.steps_long}, median of {args.repeats}, mixed precision {args.mixed_precision}\n")
    print("| trainer | steps/s | images/s | start-up s | checkpoint s | MB per checkpoint | peak RSS GiB |"
          + (" peak GPU GiB |" if "peak_cuda_bytes" in ours else ""))
    print("|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if "peak_cuda_bytes" in ours else ""))
    for name, f in (("baseline", base), ("finetune_lora.py", ours)):
        print(f"| {name} | {f['steps_per_s']:.4g} | {f['images_per_s']:.4g} | {f['startup_s']:.1f} | "
              f"{f['checkpoint_s']:.2f} | {f['checkpoint_bytes'] / 1e6:.1f} | {f['peak_rss_bytes'] / 2**30:.2f} |"
              + (f" {f['peak_cuda_bytes'] / 2**30:.2f} |" if "peak_cuda_bytes" in f else ""))
    ratios = {
        "train_speedup": ours["steps_per_s"] / base["steps_per_s"],
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
        figures = {trainer: summarize(args, results[trainer]) for trainer in TRAINERS}
        ratios = report(args, figures)
    except BenchError as error:
        print(f"bench_train: {error}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps({**ratios, "config": args.config, "resolution": args.resolution, "repeats": args.repeats,
                      "figures": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
