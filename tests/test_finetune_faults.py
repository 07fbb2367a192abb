"""finetune_lora.py at scale and under faults: two processes, SIGKILL and exact resume, SIGTERM, dead launchers,
half-written checkpoints, overwrite protection. Real subprocesses and real signals throughout."""

import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_sd21 import make_face_folder
from train_helpers import SCRIPT, accelerate_launch, lora, one_thread, train_args  # noqa: F401  (one_thread: autouse fixture)

import finetune_lora


def cpu_env():
    """Child environment: CPU only, one thread (the same thread count in every run keeps float sums identical)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command):
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cpu_env(), start_new_session=True
    )


def read_until(process, marker):
    """Read the child's stderr line by line until a line holds `marker`; return everything read."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"the run ended before printing {marker!r}:\n" + "".join(seen)[-3000:])


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def running(pid):
    """True while `pid` exists and has not exited (an exited orphan may linger as a zombie until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until_gone(pids, seconds=30):
    deadline = time.monotonic() + seconds
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(running(pid) for pid in pids)


def test_two_processes_split_the_batches_and_end_with_the_same_weights(tiny_model, face_folder, tmp_path):
    output = tmp_path / "run"
    command = accelerate_launch(
        train_args(
            tiny_model,
            face_folder,
            output,
            "--train_text_encoder",
            "--num_train_epochs",
            "2",
            "--checkpointing_steps",
            "2",
            "--verbose",
        ),
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
    )
    run = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    # One process: 8 images / batch 2 = 4 steps per epoch. Two: 2 steps per epoch, 4 in all.
    assert "2 epochs of 2 steps, 4 steps in all; total batch size 4" in run.stderr
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in output.glob("checkpoint-*"):
        assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    # Both processes print to the same pipe, interleaved with the progress bar: pick their lines out by pattern.
    first = dict(re.findall(r"process (\d)/2 first batch: (\d{5}/\d{5}\.png, \d{5}/\d{5}\.png)", run.stderr))
    assert set(first) == {"0", "1"}
    assert not set(first["0"].split(", ")) & set(first["1"].split(", "))
    checksums = dict(re.findall(r"process (\d)/2 final LoRA checksum: ([0-9a-f]{16})", run.stderr))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"]


@pytest.mark.slow
def test_two_processes_share_the_latent_caching_and_train_as_without_it(tiny_model, face_folder, tmp_path):
    finals = {}
    for name, cache in (("decoded", []), ("cached", ["--cache_latents"])):
        output = tmp_path / name
        # 8 images, both flips: 16 latents, encoded in rounds of 1 per process.
        command = accelerate_launch(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--random_flip",
                "--train_batch_size",
                "1",
                "--max_train_steps",
                "3",
                "--checkpointing_steps",
                "100",
                "--learning_rate",
                "1e-2",
                *cache,
            ),
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            free_port(),
        )
        run = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        if cache:  # 8 rounds of 1 image per process, not 16 rounds on each
            assert re.search(r"caching latents: 100%\S* *\S* 8/8 ", run.stderr), run.stderr[-3000:]
        finals[name] = lora(output)
    # Deterministic, so compared exactly: with one image per batch, the cache encodes each image alone, as training
    # without it does, through the same VAE, shapes and thread count, so the latents are the same bits. (With two
    # per batch the images are paired differently and the VAE's batched convolutions round in the last bits
    # differently; Adam's first steps divide by gradients near zero, and the weights ended up 1.8e-4 apart.) Latents
    # filed under the wrong images move the weights by about 1e-2.
    for key, value in finals["decoded"].items():
        assert torch.equal(finals["cached"][key], value), key


@pytest.mark.slow
def test_a_run_killed_after_its_second_checkpoint_resumes_to_the_same_weights(tiny_model, face_folder, tmp_path):
    def command(output):
        # 8 images / (batch 1 x 2 accumulated) = 4 steps per epoch; 4 epochs = 16 steps; a checkpoint every 3 steps,
        # so the second one (step 6) falls in the middle of an epoch. Validation grids are sampled at step 0, at
        # every checkpoint and every second epoch, between training steps, as in a real run.
        return accelerate_launch(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--train_text_encoder",
                "--random_flip",
                "--train_batch_size",
                "1",
                "--gradient_accumulation_steps",
                "2",
                "--num_train_epochs",
                "4",
                "--checkpointing_steps",
                "3",
                "--validation_prompts",
                "a face",
                "--num_validation_images",
                "1",
                "--validation_epochs",
                "2",
                "--learning_rate",
                "1e-3",
                "--resume_from_checkpoint",
                "latest",
            ),
            "--num_processes",
            "1",
        )

    reference = subprocess.run(
        command(tmp_path / "reference"), capture_output=True, text=True, env=cpu_env(), timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    output = tmp_path / "killed"
    process = start(command(output))
    try:
        read_until(process, f"Saved {output / 'checkpoint-6'}")
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (output / "pytorch_lora_weights.safetensors").exists(), "the run finished before it was killed"
    assert (output / "checkpoint-6").is_dir()

    resumed = subprocess.run(command(output), capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    expected, got = lora(tmp_path / "reference"), lora(output)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert not list(output.glob("*.tmp"))
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 16
    assert sorted(p.name for p in (output / "validation").glob("*.png")) == sorted(
        p.name for p in (tmp_path / "reference" / "validation").glob("*.png")
    )


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_latest_resumes_from_it(
    tiny_model, face_folder, tmp_path, caplog
):
    output = tmp_path / "run"
    args = train_args(
        tiny_model, face_folder, output, "--max_train_steps", "400", "--checkpointing_steps", "1000", "--verbose"
    )
    process = start([sys.executable, str(SCRIPT), *args])
    try:
        read_until(process, "first batch")
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
    finally:
        process.wait(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM after step" in rest and "--resume_from_checkpoint latest" in rest
    [checkpoint] = output.glob("checkpoint-*")
    step = finetune_lora.checkpoint_step(checkpoint)
    assert 1 <= step < 400 and finetune_lora.is_complete_checkpoint(checkpoint)
    assert not (output / "pytorch_lora_weights.safetensors").exists()

    with caplog.at_level("INFO", logger="finetune_lora"):
        assert (
            finetune_lora.main([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 2)]) == 0
        )
    assert f"Resuming from {checkpoint}" in caplog.text
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == step + 2


def test_sigterm_during_setup_ends_the_run_at_once_with_nothing_saved(tiny_model, face_folder, tmp_path):
    output = tmp_path / "run"
    args = train_args(
        tiny_model,
        face_folder,
        output,
        "--max_train_steps",
        "400",
        "--checkpointing_steps",
        "1",
        "--validation_prompts",
        "a face",
        "--num_validation_images",
        "2",
        "--verbose",
    )
    process = start([sys.executable, str(SCRIPT), *args])
    try:
        read_until(process, "Data: 8 images found")  # the data is read; the base model and validation are still to come
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
    finally:
        process.wait(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, rest[-3000:]
    last = rest.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM while ") and "before the first training step" in last
    assert "Traceback" not in rest and "first batch" not in rest
    assert not list(output.glob("checkpoint-*")) and not (output / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_a_preempted_run_checkpoints_within_the_launchers_grace_wherever_it_is_and_resumes(tiny_model, tmp_path):
    """accelerate launch (1.16) passes a SIGTERM on to the trainer and SIGKILLs it 5 s later, so a "Stopped by" line,
    exit code 143 and a complete checkpoint can only come from a trainer that was in time. A cluster signals the
    whole process group (the trainer then gets SIGTERM twice); a run is pre-empted here between two steps, during
    latent caching, during a validation grid, and once through its launcher alone, resuming each time."""
    # 160 images in both flips: caching them takes seconds, long enough to be interrupted.
    data = make_face_folder(tmp_path / "faces", count=160, size=64)

    def command(output):
        flags = ["--cache_latents", "--random_flip", "--max_train_steps", "12", "--checkpointing_steps", "4"]
        flags += ["--validation_prompts", "a face", "a smiling face", "--num_validation_images", "6"]
        return accelerate_launch(
            train_args(tiny_model, data, output, *flags, "--resume_from_checkpoint", "latest", "--verbose"),
            "--num_processes",
            "1",
        )

    reference = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True, env=cpu_env())
    assert reference.returncode == 0, reference.stderr[-3000:]

    output = tmp_path / "run"

    def preempt(marker, group=True):
        launcher = start(command(output))
        trainers = []
        try:
            seen = read_until(launcher, marker)
            trainers = children(launcher.pid)
            if group:
                os.killpg(launcher.pid, signal.SIGTERM)
            else:
                launcher.send_signal(signal.SIGTERM)
            rest = launcher.stderr.read()  # open until the trainer, which shares the pipe, exits
            launcher.wait(timeout=60)
            assert wait_until_gone(trainers), "the trainer outlived its launcher"
        finally:
            for pid in trainers:
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
        assert launcher.returncode == 128 + signal.SIGTERM, rest[-3000:]
        assert "Traceback" not in rest, rest[-3000:]
        return seen + rest

    def checkpoints():
        return sorted(finetune_lora.checkpoint_step(path) for path in finetune_lora.complete_checkpoints(output))

    rest = preempt("first batch")  # after the step-0 grid, as the first step starts
    step = checkpoints()[-1]
    assert f"Stopped by SIGTERM after step {step}; saved {output / f'checkpoint-{step}'}" in rest, rest[-3000:]
    assert 1 <= step < 4 and checkpoints() == [step]

    # A resumed run finds the latents in <output_dir>/encoding_cache: without it, it encodes them all again.
    shutil.rmtree(output / "encoding_cache")
    rest = preempt("caching latents")
    assert "latents: 0 cached, 320 to encode" in rest, rest[-3000:]
    assert "error: stopped by SIGTERM while caching latents" in rest, rest[-3000:]
    bars = re.findall(r"caching latents: +(\d+)%", rest)
    assert bars and int(bars[-1]) < 100, "the caching ran to its end instead of stopping"
    assert checkpoints() == [step]

    rest = preempt("Sampling the validation grid of step 4")  # the grid of checkpoint-4
    # What was encoded before the stop was kept; this run encoded the rest.
    cached, todo = map(int, re.search(r"latents: (\d+) cached, (\d+) to encode", rest).groups())
    assert cached > 0 and todo > 0 and cached + todo == 320, rest[-3000:]
    assert "Validation grid of step 4 given up" in rest, rest[-3000:]
    assert f"Stopped by SIGTERM after step 4; saved {output / 'checkpoint-4'}" in rest, rest[-3000:]
    assert checkpoints() == [step, 4] and not (output / "checkpoint-4" / "validation.png").exists()

    rest = preempt("Sampling the validation grid of step 8", group=False)
    assert "Validation grid of step 8 given up" in rest and "Stopped by SIGTERM after step 8" in rest, rest[-3000:]
    assert checkpoints() == [step, 4, 8]

    resumed = subprocess.run(command(output), capture_output=True, text=True, env=cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {output / 'checkpoint-8'}" in resumed.stderr
    expected, got = lora(tmp_path / "reference"), lora(output)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_latest_skips_half_written_checkpoints_and_a_broken_rng_state_fails_loudly(
    tiny_model, face_folder, tmp_path, caplog, capfd
):
    output = tmp_path / "run"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert finetune_lora.main(args) == 0
    good = output / "checkpoint-2"
    # A crash during save leaves checkpoint-N.tmp; an older writer could leave a checkpoint-N without its last files.
    shutil.copytree(good, output / "checkpoint-4.tmp")
    (output / "checkpoint-4.tmp" / finetune_lora.SETTINGS_NAME).unlink()
    shutil.copytree(good, output / "checkpoint-6")
    for name in ("optimizer.bin", "scheduler.bin", finetune_lora.SETTINGS_NAME):
        (output / "checkpoint-6" / name).unlink()

    resume = [*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "3", "--checkpointing_steps", "100"]
    with caplog.at_level("INFO", logger="finetune_lora"):
        assert finetune_lora.main(resume) == 0
    assert f"ignoring incomplete checkpoint {output / 'checkpoint-6'}" in caplog.text
    assert f"Resuming from {good}" in caplog.text
    assert not (output / "checkpoint-4.tmp").exists()
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 3

    # accelerate only logs an RNG state it cannot load and carries on; the trainer must refuse instead.
    torch.save({"step": 0}, good / "random_states_0.pkl")
    capfd.readouterr()
    assert finetune_lora.main([*args, "--resume_from_checkpoint", str(good), "--max_train_steps", "3"]) == 1
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"error: checkpoint {good} cannot be resumed: its random_states_0.pkl does not load ("), line


class RunsCode:
    """A pickle that would touch `path` when unpickled: what a checkpoint from a stranger may hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_latest_resumes_from_the_newest_checkpoint_that_loads_and_ends_as_an_uninterrupted_run(
    tiny_model, face_folder, tmp_path, caplog, capfd
):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert finetune_lora.main(train_args(tiny_model, face_folder, reference, "--max_train_steps", "6")) == 0
    args = train_args(tiny_model, face_folder, run, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert finetune_lora.main(args) == 0
    marker = tmp_path / "code-ran"
    corruptions = {
        "pytorch_lora_weights.safetensors": lambda data: b"",
        "optimizer.bin": lambda data: data[: len(data) // 2],
        "scheduler.bin": lambda data: b"",
        "random_states_0.pkl": lambda data: random.Random(0).randbytes(len(data)),
        "training_settings.json": lambda data: data[:-10],
    }
    resume = [*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "6"]
    trials = [*corruptions.items(), ("random_states_0.pkl", lambda data: pickle.dumps(RunsCode(marker), protocol=2))]
    for number, (name, corrupt) in enumerate(trials):
        trial = tmp_path / f"trial-{number}"
        shutil.copytree(run, trial)
        file = trial / "checkpoint-4" / name
        file.write_bytes(corrupt(file.read_bytes()))
        caplog.clear()
        with caplog.at_level("INFO", logger="finetune_lora"):
            assert finetune_lora.main([*resume, "--output_dir", str(trial)]) == 0, name
        assert f"skipping {trial / 'checkpoint-4'}: its {name} does not load (" in caplog.text, name
        assert f"Resuming from {trial / 'checkpoint-2'}" in caplog.text, name
        expected, got = lora(reference), lora(trial)
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    assert not marker.exists()  # the checkpoint's pickle was refused, not run

    # With no checkpoint left to resume, the run stops in one line instead of starting afresh over them.
    trial = tmp_path / "trial-none"
    shutil.copytree(run, trial)
    for checkpoint in trial.glob("checkpoint-*"):
        (checkpoint / "optimizer.bin").write_bytes(b"")
    capfd.readouterr()
    assert finetune_lora.main([*args, "--output_dir", str(trial), "--resume_from_checkpoint", "latest"]) == 1
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"error: no checkpoint in {trial} can be resumed (checkpoint-4: its optimizer.bin"), line


def test_latest_starts_afresh_after_a_kill_during_the_first_checkpoint_write(tiny_model, face_folder, tmp_path, caplog):
    output = tmp_path / "run"
    # What SIGKILL in the middle of writing checkpoint-2 leaves: its staging folder, part of the LoRA in it.
    staging = output / "checkpoint-2.tmp"
    staging.mkdir(parents=True)
    (staging / finetune_lora.LORA_WEIGHTS_NAME).write_bytes(b"\0" * 100)
    args = train_args(
        tiny_model,
        face_folder,
        output,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
    )
    with caplog.at_level("INFO", logger="finetune_lora"):
        assert finetune_lora.main(args) == 0
    assert "starting a new run" in caplog.text
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert finetune_lora.is_complete_checkpoint(output / "checkpoint-2")
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 2


def test_a_second_run_does_not_overwrite_the_first_unless_asked(tiny_model, face_folder, tmp_path, capfd):
    output = tmp_path / "run"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "1", "--checkpointing_steps", "1")
    assert (
        finetune_lora.main(
            [*args, "--report_to", "tensorboard", "--validation_prompts", "a face", "--num_validation_images", "1"]
        )
        == 0
    )
    first = load_file(output / "pytorch_lora_weights.safetensors")
    assert (output / "validation" / "step-000001.png").is_file() and list(
        (output / "logs").rglob("events.out.tfevents.*")
    )
    # Files of the user's own beside the run's: an overwrite must leave them alone.
    (output / "notes.txt").write_text("mine")
    (output / "validation" / "favourite.png").write_bytes((output / "validation" / "step-000001.png").read_bytes())
    capfd.readouterr()

    assert finetune_lora.main([*args, "--seed", "1"]) == 1
    assert "already holds a training run" in capfd.readouterr().err
    assert all(torch.equal(first[k], v) for k, v in load_file(output / "pytorch_lora_weights.safetensors").items())

    assert (
        finetune_lora.main(
            [*args, "--seed", "1", "--max_train_steps", "2", "--checkpointing_steps", "2", "--overwrite_output_dir"]
        )
        == 0
    )
    second = load_file(output / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # Nothing of the first run is left to mix with the second: no old checkpoints, grids, logs or model card.
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "checkpoint-2",
        "notes.txt",
        "pytorch_lora_weights.safetensors",
        "training_settings.json",
        "validation",
    ]
    assert [p.name for p in (output / "validation").iterdir()] == ["favourite.png"]
    assert "for 2 steps" in (output / "README.md").read_text()


def test_a_second_run_into_a_folder_being_trained_stops_at_once_and_the_first_finishes_intact(
    tiny_model, face_folder, tmp_path, capfd
):
    output = tmp_path / "run"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "6", "--checkpointing_steps", "2")
    port = free_port()
    first = start(
        accelerate_launch([*args, "--verbose"], "--multi_gpu", "--num_processes", 2, "--main_process_port", port)
    )
    try:
        read_until(first, "first batch")
        capfd.readouterr()
        assert finetune_lora.main([*args, "--seed", "1"]) == 1
        [line] = capfd.readouterr().err.splitlines()
        holder = re.search(rf"^error: {re.escape(str(output))} is being written by another run \(process (\d+)\)", line)
        assert holder and running(int(holder[1])) and int(holder[1]) != os.getpid(), line
        rest = first.stderr.read()
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, rest[-3000:]
    assert json.loads((output / "training_settings.json").read_text())["seed"] == 42
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # The lock ends with its run: the folder is free again, and holds a finished run to protect.
    assert finetune_lora.main([*args, "--seed", "1"]) == 1
    assert "already holds a training run" in capfd.readouterr().err


def test_overwrite_refuses_a_symbolic_link_before_it_deletes_anything(tiny_model, face_folder, tmp_path, capfd):
    output, elsewhere = tmp_path / "run", tmp_path / "other-run" / "checkpoint-10"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "1", "--checkpointing_steps", "1")
    assert finetune_lora.main(args) == 0
    shutil.copytree(output / "checkpoint-1", elsewhere)
    (output / "checkpoint-10").symlink_to(elsewhere, target_is_directory=True)
    before = sorted((p, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    capfd.readouterr()
    assert finetune_lora.main([*args, "--overwrite_output_dir"]) == 1
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"error: {output / 'checkpoint-10'} is or lies in a symbolic link"), line
    assert sorted((p, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_two_processes_preempted_during_the_main_process_grid_stop_together_and_resume(tiny_model, tmp_path):
    """Validation samples on the main process alone: a stop it sees mid-grid must reach the other process, waiting at
    the checkpoint, so that both save the same step and exit; the resumed pair ends as an uninterrupted pair."""
    data = make_face_folder(tmp_path / "faces", count=8, size=64)

    def command(output):
        flags = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--validation_prompts", "a face"]
        flags += ["--num_validation_images", "8", "--resume_from_checkpoint", "latest", "--verbose"]
        launcher = ["--multi_gpu", "--num_processes", 2, "--main_process_port", free_port()]
        return accelerate_launch(train_args(tiny_model, data, output, *flags), *launcher)

    reference = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True, env=cpu_env())
    assert reference.returncode == 0, reference.stderr[-3000:]
    output = tmp_path / "run"
    launcher = start(command(output))
    try:
        read_until(launcher, "Sampling the validation grid of step 4")
        os.killpg(launcher.pid, signal.SIGTERM)
        rest = launcher.stderr.read()
    finally:
        launcher.wait(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "Validation grid of step 4 given up" in rest and "Stopped by SIGTERM after step 4" in rest, rest[-3000:]
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-4"]
    assert finetune_lora.is_complete_checkpoint(output / "checkpoint-4")
    assert (output / "checkpoint-4" / "random_states_1.pkl").is_file()

    resumed = subprocess.run(command(output), capture_output=True, text=True, env=cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = lora(tmp_path / "reference"), lora(output)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
