"""Smoke tests of the benchmarks at --config tiny, one repetition: both run end to end as real processes
against the real scripts and end with one JSON line of sane figures. No timing is asserted. The three benchmark runs
are marked slow: `python -m pytest -m slow` runs them, the default run skips them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tiny models are all per-op overhead: one thread a process keeps the shared test machine from thrashing.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_bench(script: str, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *flags],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def last_json_line(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_positive(value):
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, value


@pytest.mark.slow
def test_bench_train_tiny_ends_with_the_ratios(tmp_path):
    report = last_json_line(
        run_bench("bench_train.py", "--config", "tiny", "--repeats", "1", "--work_dir", str(tmp_path))
    )
    for key in ("train_speedup", "train_cpu_speedup", "checkpoint_size_ratio", "peak_memory_ratio"):
        assert_positive(report[key])
    assert (report["config"], report["resolution"], report["repeats"]) == ("tiny", 64, 1)
    for trainer in ("baseline", "ours"):
        figures = report["figures"][trainer]
        for key in ("steps_per_s", "images_per_s", "cpu_s_per_step", "checkpoint_bytes", "peak_rss_bytes"):
            assert_positive(figures[key])
        assert figures["checkpoint_s"] >= 0
        assert figures["images_per_s"] == figures["steps_per_s"]  # batch size 1
    # Ours keeps only the LoRA, its optimizer and RNG state; the baseline writes the whole UNet and text encoder.
    assert report["checkpoint_size_ratio"] < 0.5
    ours, baseline = report["figures"]["ours"], report["figures"]["baseline"]
    assert math.isclose(report["checkpoint_size_ratio"], ours["checkpoint_bytes"] / baseline["checkpoint_bytes"])
    assert math.isclose(report["train_speedup"], ours["steps_per_s"] / baseline["steps_per_s"])
    logs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert logs == ["baseline-0.log", "ours-0.log"]  # the run folders themselves are removed


@pytest.mark.slow
def test_bench_generate_tiny_ends_with_the_ratios(tmp_path):
    report = last_json_line(
        run_bench(
            "bench_generate.py", "--config", "tiny", "--repeats", "1", "--num_images", "2", "--work_dir", str(tmp_path)
        )
    )
    for key in ("fused_speedup", "dpmpp25_speedup", "fused_cpu_speedup", "dpmpp25_cpu_speedup"):
        assert_positive(report[key])
    assert set(report["figures"]) == {"original", "fused", "dpm++ 25"}
    for figures in report["figures"].values():
        assert_positive(figures["s_per_image"])
        assert_positive(figures["cpu_s_per_image"])
        assert_positive(figures["peak_rss_bytes"])
    original = report["figures"]["original"]["s_per_image"]
    assert math.isclose(report["fused_speedup"], original / report["figures"]["fused"]["s_per_image"])
    # Every setting wrote its two 64x64 images.
    for folder in ("original-0", "fused-0", "dpm++25-0"):
        assert len(list((tmp_path / "images" / folder).glob("*.png"))) == 2


def test_bench_reports_a_missing_reference_folder_in_one_line(tmp_path, scripts):
    flags = ["--config", "small", "--reference_dir", tmp_path / "nowhere", "--work_dir", tmp_path / "work"]
    result = scripts.run(REPO / "benchmarks" / "bench_generate.py", flags, env=ENV, libraries=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("bench_generate: no SD2.1 reference configs in")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_gpu_tiny_puts_eager_and_compile_side_by_side(tmp_path):
    # Four processes, two of them compiling (a few minutes on a cold Inductor cache and busy cores).
    report = last_json_line(run_bench("bench_gpu.py", "--config", "tiny", "--work_dir", str(tmp_path), timeout=1200))
    assert (report["config"], report["resolution"], report["device"]) == ("tiny", 64, "cpu")
    for key in ("peak_tflops", "tflop_per_image", "tflop_per_training_image"):
        assert_positive(report[key])
    for mode in ("eager", "compile"):
        figures = report[mode]
        for key in ("cold_start_s", "s_per_image", "images_per_s", "train_images_per_s", "peak_host_bytes"):
            assert_positive(figures[key])
        for key in ("single_peak_percent", "batched_peak_percent", "train_peak_percent", "train_peak_host_bytes"):
            assert_positive(figures[key])
        assert figures["peak_gpu_bytes"] is None and figures["train_peak_gpu_bytes"] is None  # no GPU here
        assert figures["best_batch"] == 1 and list(figures["images_per_s_by_batch"]) == ["1"]
        assert figures["images_per_s"] == 1 / figures["s_per_image"]  # batch 1 is the batch-1 run
        # The percentage of peak is the FLOP rate over the probe's.
        assert math.isclose(
            figures["single_peak_percent"],
            100 * report["tflop_per_image"] / figures["s_per_image"] / report["peak_tflops"],
        )
    assert report["eager"]["compile_s"] == 0 and report["compile"]["compile_s"] > 0
    assert math.isclose(
        report["compile_speedup"]["train_images_per_s"],
        report["compile"]["train_images_per_s"] / report["eager"]["train_images_per_s"],
    )
    # One sampling run per mode, 3 images at batch 1.
    assert sorted(p.name for p in (tmp_path / "images").iterdir() if p.is_dir()) == ["compile-batch1", "eager-batch1"]
    for mode in ("eager", "compile"):
        assert len(list((tmp_path / "images" / f"{mode}-batch1").glob("*.png"))) == 3


@pytest.mark.slow
def test_bench_cache_tiny_ends_with_the_ratios(tmp_path):
    # 10 steps between the checkpoints: CPU time is sampled every 0.1 s, and a tiny step can take less.
    flags = ["--counts", "8", "16", "--resolution", "64", "--checkpointing_steps", "10", "--work_dir", str(tmp_path)]
    report = last_json_line(run_bench("bench_cache.py", *flags))
    for key in ("warm_over_cold_startup", "disk_over_memory_steps_per_s", "memory_over_disk_cpu_s_per_step"):
        assert_positive(report[key])
    assert (report["resolution"], report["counts"]) == (64, [8, 16])
    for count in ("8", "16"):
        figures = report["figures"][count]
        assert figures["memory_cache_bytes"] == int(count) * 8 * 8 * 8 * 4  # 8 x 8 x 8 fp32 latents, one per image
        assert figures["disk_cache_bytes"] > figures["memory_cache_bytes"]  # the same tensors, in shards with headers
        for run in ("cold", "warm", "memory"):
            assert_positive(figures[run]["steps_per_s"])
            assert_positive(figures[run]["peak_rss_bytes"])
