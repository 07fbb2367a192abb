"""Latent-cache benchmark: finetune_lora.py's disk cache (--cache_latents into --encoding_cache_dir) against the
in-memory dict it replaced, at two dataset sizes.

Every run is a real `python finetune_lora.py` process on the tiny SD2.1-shaped model and a folder of synthetic
captioned faces, --cache_latents --center_crop, UNet LoRA only, batch 4, a checkpoint every K steps, no validation.
For each image count there are three runs:
    cold    the disk cache, built by this run (a fresh cache folder): 2K steps
    warm    the disk cache again, the same folder: nothing to encode; it trains for an epoch of the largest count
            at both counts (at least 2K steps), so that every latent is read and the two differ only in their data
    memory  the warm cache, but read whole into a dict of tensors in the process before the first step: the old
            in-memory --cache_latents (every latent in host memory), the comparator of speed and memory: 2K steps
Steady steps/s and start-up are bench_train.py's: K / (start of checkpoint 2K - end of checkpoint K), and the time
from launch to checkpoint K less K steps at that rate (imports, model loading, hashing the images, encoding what is
missing, the first step's warm-up). Peak memory is the training process's peak resident set (wait4's rusage).
The in-memory cache's size is computed: entries x bytes per entry, read from a shard.

    python benchmarks/bench_cache.py --quick       # 100 and 1,000 images: about 5 minutes on 2 CPU cores
    python benchmarks/bench_cache.py               # 500 and 5,000 images at 256 px: about 20 minutes
    python benchmarks/bench_cache.py --counts 8 16 --resolution 64 --checkpointing_steps 2   # the tests' smoke run

The last line printed is one JSON object:
    {"rss_growth_over_memory_cache": disk peak RSS (big - small) / the in-memory cache's size at big,
     "warm_over_cold_startup": ..., "disk_over_memory_steps_per_s": ..., "figures": {...}}
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, BenchError, folder_bytes, prepare_faces, prepare_model, run_measured, subprocess_env
from PIL import Image

# The old --cache_latents, rebuilt from the disk cache: every latent copied into a dict in this process.
IN_MEMORY = """import sys
sys.path.insert(0, sys.argv.pop(1))
import finetune_lora
fill_cache = finetune_lora.fill_cache
def in_memory(*args, **kwargs):
    cache = fill_cache(*args, **kwargs)
    return {item: cache[item].clone() for item in cache.keys if item in cache}
finetune_lora.fill_cache = in_memory
sys.exit(finetune_lora.main(sys.argv[1:]))
"""
BATCH_SIZE = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark the disk latent cache against the in-memory one.")
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 images instead of 500 and 5,000.")
    parser.add_argument("--counts", type=int, nargs=2, metavar=("SMALL", "BIG"), help="Other image counts.")
    parser.add_argument("--resolution", type=int, default=256, help="Training side in pixels.")
    parser.add_argument("--checkpointing_steps", type=int, default=10, help="K: time steps K to 2K.")
    parser.add_argument(
        "--work_dir", type=Path, help="Keep the model, faces, caches and logs here (default: a temp folder)."
    )
    args = parser.parse_args(argv)
    args.counts = tuple(args.counts or ((100, 1000) if args.quick else (500, 5000)))
    return args


def run(args, name: str, model: Path, faces: Path, cache: Path, work_dir: Path, steps: int) -> dict:
    output = work_dir / "runs" / name
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    k = args.checkpointing_steps
    flags = ["--pretrained_model_name_or_path", model, "--train_data_dir", faces, "--output_dir", output]
    flags += ["--encoding_cache_dir", cache, "--resolution", args.resolution, "--center_crop", "--cache_latents"]
    flags += ["--train_batch_size", BATCH_SIZE, "--max_train_steps", steps, "--checkpointing_steps", k]
    flags += ["--rank", "8", "--report_to", "none", "--validation_prompts", "none"]
    prefix = ["-c", IN_MEMORY, str(REPO)] if name.startswith("memory") else [str(REPO / "finetune_lora.py")]
    command = [sys.executable, *prefix, *map(str, flags)]
    measured = run_measured(command, subprocess_env(), output.with_suffix(".log"), output)
    if not {k, 2 * k} <= set(measured.checkpoints):
        raise BenchError(f"{name} wrote checkpoints {sorted(measured.checkpoints)}, expected {k} and {2 * k}")
    (first_start, first_end), (second_start, _) = measured.checkpoints[k], measured.checkpoints[2 * k]
    steps_per_s = k / (second_start - first_end)
    cpu_s_per_step = (measured.cpu_seconds_at(second_start) - measured.cpu_seconds_at(first_end)) / k
    if cpu_s_per_step <= 0:  # CPU time is sampled every 0.1 s
        raise BenchError(f"{name}'s {k} timed steps were too fast to time: raise --checkpointing_steps")
    figures = {
        "steps_per_s": steps_per_s,
        "startup_s": (first_start - measured.launched) - k / steps_per_s,
        "cpu_s_per_step": cpu_s_per_step,
        "startup_cpu_s": measured.cpu_seconds_at(first_start) - k * cpu_s_per_step,
        "peak_rss_bytes": measured.peak_rss_bytes,
    }
    print(
        f"{name:12s} {steps} steps, {steps_per_s:.3g} steps/s ({cpu_s_per_step:.3g} CPU s/step), start-up "
        f"{figures['startup_s']:.1f} s ({figures['startup_cpu_s']:.1f} CPU s), "
        f"peak RSS {figures['peak_rss_bytes'] / 2**20:.0f} MiB",
        flush=True,
    )
    shutil.rmtree(output)
    return figures


def unique_faces(work_dir: Path, resolution: int, count: int) -> Path:
    """prepare_faces's folder, each face with its number in binary in its first 16 pixels: the synthetic faces repeat
    (a few hundred differ), and the cache keeps one latent per distinct file."""
    faces = prepare_faces(work_dir, resolution, count)
    for line in (faces / "metadata.jsonl").read_text().splitlines():
        path = faces / json.loads(line)["file_name"]
        with Image.open(path) as image:
            image = image.convert("RGB")
        for bit in range(16):
            image.putpixel((bit, 0), (255, 255, 255) if int(path.stem) >> bit & 1 else (0, 0, 0))
        image.save(path)
    return faces


def entry_bytes(cache: Path) -> int:
    """Bytes of one latent in the cache (what the in-memory dict held per entry)."""
    from safetensors import safe_open

    with safe_open(next((cache / "latents").glob("shard-*.safetensors")), framework="pt") as shard:
        tensor = shard.get_tensor(next(iter(shard.keys())))
    return tensor.numel() * tensor.element_size()


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="t2f-bench-cache-"))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        model = prepare_model("tiny", work_dir, REPO / "benchmarks" / "sd21_configs")
        figures, timed = {}, 2 * args.checkpointing_steps
        steps = {"cold": timed, "warm": max(timed, math.ceil(max(args.counts) / BATCH_SIZE)), "memory": timed}
        for count in args.counts:
            faces = unique_faces(work_dir, args.resolution, count)
            cache = work_dir / f"cache-{args.resolution}px-{count}"
            shutil.rmtree(cache, ignore_errors=True)
            figures[count] = {
                name: run(args, f"{name}-{count}", model, faces, cache, work_dir, steps[name]) for name in steps
            }
            figures[count]["memory_cache_bytes"] = count * entry_bytes(cache)
            figures[count]["disk_cache_bytes"] = folder_bytes(cache)
    except BenchError as error:
        print(f"bench_cache: {error}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    small, big = (figures[count] for count in args.counts)
    print(
        f"\ntiny model, {args.resolution} px, batch {BATCH_SIZE}; warm: an epoch, the others {2 * args.checkpointing_steps}"
        " steps\n"
    )
    print("| images | run | steps/s | CPU s/step | start-up s | start-up CPU s | peak RSS MiB | in-memory cache MiB |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|")
    for count in args.counts:
        for name in ("cold", "warm", "memory"):
            f = figures[count][name]
            print(
                f"| {count:,} | {name} | {f['steps_per_s']:.3g} | {f['cpu_s_per_step']:.3g} | {f['startup_s']:.1f} | "
                f"{f['startup_cpu_s']:.1f} | {f['peak_rss_bytes'] / 2**20:.0f} | "
                f"{figures[count]['memory_cache_bytes'] / 2**20:.0f} |"
            )
    ratios = {
        "rss_growth_over_memory_cache": (big["warm"]["peak_rss_bytes"] - small["warm"]["peak_rss_bytes"])
        / big["memory_cache_bytes"],
        "memory_rss_growth_over_memory_cache": (big["memory"]["peak_rss_bytes"] - small["memory"]["peak_rss_bytes"])
        / big["memory_cache_bytes"],
        "warm_over_cold_startup": big["warm"]["startup_s"] / big["cold"]["startup_s"],
        "warm_over_cold_startup_cpu": big["warm"]["startup_cpu_s"] / big["cold"]["startup_cpu_s"],
        "disk_over_memory_steps_per_s": big["warm"]["steps_per_s"] / big["memory"]["steps_per_s"],
        # On a CPU shared with other work, CPU time per step is the steadier measure of the same ratio.
        "memory_over_disk_cpu_s_per_step": big["memory"]["cpu_s_per_step"] / big["warm"]["cpu_s_per_step"],
    }
    print(json.dumps({**ratios, "resolution": args.resolution, "counts": args.counts, "figures": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
