"""How `accelerate launch` starts the scripts (issue 22): `--num_processes N` without `--multi_gpu` on a CPU host
starts one process, and both scripts stop in one line saying what starts N; with `--quiet`, as the README writes
its commands, a user error ends in that line alone, without accelerate's traceback."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from train_helpers import accelerate_launch, train_args

REPO = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(script: str, script_args, *launcher_args):
    command = accelerate_launch(script_args, *launcher_args)
    command[command.index(str(REPO / "finetune_lora.py"))] = str(REPO / script)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def script_args(script: str, tiny_model, face_folder, output: Path) -> list:
    if script == "generate.py":
        return [
            "--base_model",
            tiny_model,
            "--prompt",
            "a face",
            "--lora",
            "none",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
        ] + [
            "--output_dir",
            output,
        ]
    return train_args(tiny_model, face_folder, output, "--max_train_steps", "1")


# One spelling of the flag each: the scripts' check_process_count is one function (tests/test_copies.py).
@pytest.mark.parametrize(
    "script, flag", [("generate.py", "--num_processes=2"), ("finetune_lora.py", "--num_processes 2")]
)
def test_two_processes_asked_without_multi_gpu_stop_in_one_line(script, flag, tiny_model, face_folder, tmp_path):
    output = tmp_path / "out"
    result = launch(script, script_args(script, tiny_model, face_folder, output), "--quiet", *flag.split())
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: accelerate launch --num_processes 2 started 1 process, as it does without --multi_gpu where "
        "there are not 2 GPUs: add --multi_gpu (it starts 2 processes on CPUs too)"
    ], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not output.exists()  # stopped before anything was written


def test_one_process_asked_runs(tiny_model, face_folder, tmp_path):
    result = launch("generate.py", script_args("generate.py", tiny_model, face_folder, tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 1 process(es)" in result.stdout


def test_ctrl_c_is_reported_once_as_sigint(tiny_model, face_folder, tmp_path):
    """A Ctrl-C reaches the launcher and the trainer together; the launcher then sends the trainer a SIGTERM too."""
    args = train_args(tiny_model, face_folder, tmp_path / "out", "--max_train_steps", "400", "--verbose")
    command = accelerate_launch(args, "--quiet", "--num_processes", "1")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    for line in launcher.stderr:
        if "first batch" in line:
            break
    os.killpg(launcher.pid, signal.SIGINT)
    rest = launcher.stderr.read()
    launcher.wait(timeout=60)
    stops = [line for line in rest.splitlines() if "Stopped by" in line]
    assert len(stops) == 1 and stops[0].startswith("Stopped by SIGINT after step "), rest[-3000:]
    assert "Traceback" not in rest, rest[-3000:]


@pytest.mark.parametrize("script", ["generate.py", "finetune_lora.py"])
def test_a_user_error_under_two_processes_is_said_once(script, face_folder, tmp_path):
    port = free_port()
    args = script_args(script, tmp_path / "no-such-model", face_folder, tmp_path / "out")
    result = launch(script, args, "--quiet", "--multi_gpu", "--num_processes", "2", "--main_process_port", port)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no such folder" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
