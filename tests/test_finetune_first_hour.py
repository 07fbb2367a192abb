"""finetune_lora.py as a new user meets it: failing fast with the right diagnosis (no network, a wrong path, a place
it cannot write, a full disk, a captions file in another encoding), defaults and help that tell the truth, and a
quiet log whose figures label themselves. Real processes, a closed port or a loopback Hub for the network, real
mounts for read-only and full disks."""

import csv
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hub_server import FakeHub
from PIL import Image
from train_helpers import SCRIPT, accelerate_launch, one_thread, train_args  # noqa: F401  (one_thread: autouse fixture)

import finetune_lora
import generate

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def online_env(hf_home: Path, endpoint: str) -> dict:
    return {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": endpoint,
        "NO_PROXY": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def run_script(scripts, args, env, timeout=300):
    """`python finetune_lora.py ARGS` under `env`, in a process of its own forked from an interpreter that has
    imported torch (tests/script_server.py); (the result, its seconds)."""
    started = time.monotonic()
    result = scripts.run(SCRIPT, args, env=env, timeout=timeout)
    return result, time.monotonic() - started


def error_lines(err: str) -> list:
    return [line for line in err.strip().splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------------------------------------- the network


def test_an_unreachable_hub_fails_at_once_in_one_line_that_names_the_model_and_the_fixes(
    scripts, face_folder, tmp_path
):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result, seconds = run_script(
        scripts,
        ["--train_data_dir", face_folder, "--output_dir", tmp_path / "run", "--resolution", "64"],
        online_env(tmp_path / "empty-hf-home", endpoint),
    )
    print(f"failed after {seconds:.1f} s (imports but torch's included)")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()  # no retry warnings, nothing twice
    assert line.startswith(f"error: cannot reach the Hub at {endpoint} (")
    assert f"to fetch base model {finetune_lora.DEFAULT_BASE_MODEL}, which is not in the Hugging Face cache" in line
    assert f"`python download.py --base_model {finetune_lora.DEFAULT_BASE_MODEL}`" in line
    assert "HF_HUB_OFFLINE=1" in line and "--pretrained_model_name_or_path /path/to/folder" in line
    assert not (tmp_path / "run").exists()


def test_a_cached_base_model_trains_with_no_hub_and_no_retries(scripts, tiny_model, face_folder, tmp_path):
    """The cache is filled from a loopback Hub the way download.py fills it; then the Hub is gone and the run,
    still online as far as huggingface_hub knows, must not ask it anything."""
    hf_home = tmp_path / "hf-home"
    hub = FakeHub()
    hub.add_repo(
        "tester/tiny-sd21",
        {p.relative_to(tiny_model).as_posix(): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()},
    )
    try:
        fill = subprocess.run(
            [
                sys.executable,
                "-c",
                "from huggingface_hub import snapshot_download; snapshot_download('tester/tiny-sd21')",
            ],
            env=online_env(hf_home, hub.url),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        hub.close()
    assert fill.returncode == 0, fill.stderr[-3000:]

    args = train_args("tester/tiny-sd21", face_folder, tmp_path / "run", "--max_train_steps", "1")
    result, seconds = run_script(scripts, args, online_env(hf_home, f"http://127.0.0.1:{closed_port()}"))
    print(f"trained from the cache in {seconds:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Retrying" not in result.stderr and "thrown while requesting" not in result.stderr
    settings = json.loads((tmp_path / "run" / "training_settings.json").read_text())
    assert settings["base_model"] == "tester/tiny-sd21" and settings["global_step"] == 1


def test_offline_without_the_model_in_the_cache_says_so_in_one_line(scripts, face_folder, tmp_path):
    env = {**online_env(tmp_path / "empty-hf-home", "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    result, _ = run_script(scripts, ["--train_data_dir", face_folder, "--output_dir", tmp_path / "run"], env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: cannot load base model {finetune_lora.DEFAULT_BASE_MODEL}, which is not in the Hugging Face cache "
        f"({tmp_path / 'empty-hf-home' / 'hub'}), with HF_HUB_OFFLINE=1: "
    )
    assert "python download.py --base_model" in line
    assert not (tmp_path / "run").exists()


def test_offline_one_line_names_every_missing_model_and_the_one_command_that_fetches_them(
    scripts, face_folder, tmp_path
):
    env = {**online_env(tmp_path / "empty-hf-home", "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    result, _ = run_script(
        scripts, ["--train_data_dir", face_folder, "--output_dir", tmp_path / "run", "--validation_score"], env
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: cannot load base model {finetune_lora.DEFAULT_BASE_MODEL} and score model "
        f"{finetune_lora.DEFAULT_SCORE_MODEL}, which are not in the Hugging Face cache "
        f"({tmp_path / 'empty-hf-home' / 'hub'}), with HF_HUB_OFFLINE=1: run `python download.py --base_model "
        f"{finetune_lora.DEFAULT_BASE_MODEL} --score_model {finetune_lora.DEFAULT_SCORE_MODEL}` where there is a network"
    ), line
    assert "--pretrained_model_name_or_path /path/to/folder and --score_model /path/to/folder" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["./models/sd21", "~/sd21", "/absolute/sd21", "data/models/sd21"])
def test_a_base_model_path_that_does_not_exist_is_no_such_folder(face_folder, tmp_path, capfd, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code = finetune_lora.main(train_args(name, face_folder, tmp_path / "run"))
    err = capfd.readouterr().err
    assert code == 1
    shown = str(tmp_path / "home" / "sd21") if name.startswith("~") else name
    assert error_lines(err) == [
        f"error: --pretrained_model_name_or_path: no such folder: {shown}: pass the folder of a diffusers Stable "
        f"Diffusion 2.1 pipeline or a Hub id like {finetune_lora.DEFAULT_BASE_MODEL}"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("part", ["tokenizer", "unet", "model_index.json"])
def test_a_base_model_folder_missing_a_part_is_one_line_before_anything_loads(
    tiny_model, face_folder, tmp_path, capfd, part
):
    model = shutil.copytree(tiny_model, tmp_path / "sd21")
    shutil.rmtree(model / part) if (model / part).is_dir() else (model / part).unlink()
    assert finetune_lora.main(train_args(model, face_folder, tmp_path / "run")) == 1
    assert error_lines(capfd.readouterr().err) == [
        f"error: --pretrained_model_name_or_path {model} has no {part}: pass the folder of a diffusers Stable "
        f"Diffusion 2.1 pipeline, complete, or a Hub id like {finetune_lora.DEFAULT_BASE_MODEL}"
    ]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- writing


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no process may write into, root included: permission bits for a user, a read-only tmpfs for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize(
    "where", ["read-only folder", "existing file", "under a file", "logging dir is a file", "LoRA path is a folder"]
)
def test_an_output_place_that_cannot_be_written_fails_before_anything_loads(
    tiny_model, face_folder, tmp_path, capfd, request, where
):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    extra, flag = [], "--output_dir"
    if where == "read-only folder":
        output = request.getfixturevalue("read_only_folder") / "run"
        expected = f"cannot write to {output}: {output.parent} is not writable ("
    elif where == "existing file":
        output = a_file
        expected = f"cannot write to {output}: {output} is a file, not a folder"
    elif where == "under a file":
        output = a_file / "run"
        expected = f"cannot write to {output}: {a_file} is a file, not a folder"
    elif where == "logging dir is a file":
        output, flag = tmp_path / "run", "--logging_dir"
        extra = ["--report_to", "tensorboard", "--logging_dir", a_file]
        expected = f"cannot write to {a_file}: {a_file} is a file, not a folder"
    else:
        output = tmp_path / "run"
        (output / finetune_lora.LORA_WEIGHTS_NAME).mkdir(parents=True)
        expected = f"cannot write the LoRA to {output / finetune_lora.LORA_WEIGHTS_NAME}: it is a folder"
    before = sorted(tmp_path.rglob("*"))
    code = finetune_lora.main(train_args(tiny_model, face_folder, output, *extra))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err  # one line, nothing read or loaded before it
    assert err[0].endswith(f"pass another {flag}")
    assert sorted(tmp_path.rglob("*")) == before  # nothing left behind


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs (room for one checkpoint of the tiny model, not two) and a way to make room on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("no right to mount a tmpfs to fill (needs root with CAP_SYS_ADMIN)")

    def make_room():
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)

    yield disk, make_room
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_resume(tiny_model, face_folder, small_disk, capfd):
    disk, make_room = small_disk
    output = disk / "run"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "3", "--checkpointing_steps", "1")
    code = finetune_lora.main(args)
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith(f"error: cannot write {output / 'checkpoint-2'} (")
    assert line.endswith(
        f"MiB free there); the last complete checkpoint is {output / 'checkpoint-1'}: make room, then run the same "
        "command with --resume_from_checkpoint latest"
    )
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-1"]  # the half-written one is gone
    assert finetune_lora.is_complete_checkpoint(output / "checkpoint-1")

    make_room()
    assert finetune_lora.main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 3


def test_saved_files_get_the_mode_the_users_umask_gives_any_file(tiny_model, face_folder, tmp_path):
    previous = os.umask(0o002)
    try:
        args = train_args(tiny_model, face_folder, tmp_path / "run", "--max_train_steps", "1")
        code = finetune_lora.main([*args, "--checkpointing_steps", "1"])
        (tmp_path / "made-by-the-user").write_text("")
    finally:
        os.umask(previous)
    assert code == 0
    expected = (tmp_path / "made-by-the-user").stat().st_mode & 0o777
    assert expected == 0o664
    run = tmp_path / "run"
    modes = {p.relative_to(run).as_posix(): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert "checkpoint-1/pytorch_lora_weights.safetensors" in modes and "pytorch_lora_weights.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != expected} == {}


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_captions_file_that_is_not_utf8_is_one_line(tiny_model, face_folder, tmp_path, capfd, encoding):
    metadata = face_folder / "metadata.jsonl"
    text = metadata.read_text().replace('"text": "', '"text": "Une femme très ', 1)
    metadata.write_bytes(text.encode(encoding))
    code = finetune_lora.main(train_args(tiny_model, face_folder, tmp_path / "run"))
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = error_lines(err)
    assert re.fullmatch(
        rf"error: captions file {re.escape(str(metadata))} is not UTF-8 text \(byte 0x[0-9a-f]{{2}} at offset \d+\): "
        "save it as UTF-8",
        line,
    )


def test_a_captions_file_with_a_byte_order_mark_is_read(face_folder, tmp_path):
    records = [json.loads(line) for line in (face_folder / "metadata.jsonl").read_text().splitlines()]
    (face_folder / "metadata.jsonl").unlink()
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="", encoding="utf-8-sig") as handle:  # as Excel and Notepad save UTF-8
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([r["file_name"], r["text"]] for r in records)
    args = ["--train_data_dir", str(face_folder), "--captions_file", str(captions)]
    loaded = finetune_lora.load_records(finetune_lora.parse_args(args), show_progress=False)
    assert len(loaded) == 8


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "0"], "--resolution 0 is not a positive multiple of 8"),
        (["--resolution", "-64"], "--resolution -64 is not a positive multiple of 8"),
        (["--resolution", "100"], "--resolution 100 is not a positive multiple of 8"),
        (["--learning_rate=-1e-5"], "--learning_rate -1e-05 must be 0 or more"),
        (["--learning_rate_text_encoder", "-1"], "--learning_rate_text_encoder -1.0 must be 0 or more"),
    ],
)
def test_nonsense_values_are_refused_before_anything_loads(tmp_path, capfd, flags, message):
    code = finetune_lora.main(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"), *flags])
    assert code == 1
    [line] = capfd.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()


def test_an_error_without_text_still_gets_a_message():
    assert finetune_lora.first_line(OSError()) == "OSError"
    assert finetune_lora.first_line(RuntimeError("\n")) == "RuntimeError"
    assert finetune_lora.first_line(ValueError("first\nsecond")) == "first"


# ---------------------------------------------------------------------------------------------- defaults and help


def help_entries(text: str) -> dict:
    """{flag: its help text} from `--help` output."""
    entries, flag = {}, None
    for line in text.splitlines():
        if match := re.match(r"^  (--\w+)", line):
            flag = match[1]
            entries[flag] = line[len(flag) + 2 :]
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {flag: " ".join(help.split()) for flag, help in entries.items()}


def test_help_shows_every_default_and_ends_with_the_docstrings_examples(capsys):
    with pytest.raises(SystemExit) as exited:
        finetune_lora.parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.endswith(finetune_lora.__doc__[finetune_lora.__doc__.index("    accelerate") :])
    entries = help_entries(text)
    assert len(entries) > 50 and "--help" not in entries
    assert {flag for flag, help in entries.items() if "default" not in help} == set()
    assert "(default: 768)" in entries["--resolution"] and "(default: 1e-05)" in entries["--learning_rate"]
    assert "(default: off)" in entries["--train_text_encoder"]


def published_command() -> list:
    """The flags of the README's command that trained the published checkpoint."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("The command that trained the published checkpoint", 1)[1].split("```bash", 1)[1]
    command = block.split("```", 1)[0].split("accelerate launch finetune_lora.py", 1)[1]
    return shlex.split(command.replace("\\\n", " "))


def test_the_defaults_are_the_published_recipe_and_the_readme_says_so():
    flags = published_command()
    published = vars(finetune_lora.parse_args(flags))
    defaults = vars(finetune_lora.parse_args(["--train_data_dir", "x"]))
    assert defaults["learning_rate_text_encoder"] is None  # it follows --learning_rate
    defaults["learning_rate_text_encoder"] = defaults["learning_rate"]
    differing = {key for key in defaults if published[key] != defaults[key]}
    # What only a flag can switch on, and what names the user's own model, data and folders.
    assert differing == {
        "train_text_encoder",
        "center_crop",
        "gradient_checkpointing",
        "pretrained_model_name_or_path",
        "train_data_dir",
        "output_dir",
        "encoding_cache_dir",
        "resume_from_checkpoint",
        "validation_prompts",
    }
    assert defaults["validation_prompts"][:2] == published["validation_prompts"]
    readme = (REPO / "README.md").read_text()
    assert "--resolution 768" in readme and "--learning_rate 1e-5" in readme and "--validation_prompts none" in readme


def test_validation_prompts_default_to_faces_and_none_switches_them_off(tmp_path):
    assert (
        finetune_lora.parse_args(["--train_data_dir", "x"]).validation_prompts
        == finetune_lora.DEFAULT_VALIDATION_PROMPTS
    )
    assert finetune_lora.parse_args(["--train_data_dir", "x", "--validation_prompts", "none"]).validation_prompts == []
    assert finetune_lora.parse_args(["--train_data_dir", "x", "--validation_prompts", "a face"]).validation_prompts == [
        "a face"
    ]


# ---------------------------------------------------------------------------------------------- the log and figures


def test_a_run_logs_only_what_a_user_can_act_on_labels_its_grids_and_ends_with_the_next_command(
    tiny_model, face_folder, tmp_path
):
    output = tmp_path / "run"
    args = [
        "--pretrained_model_name_or_path",
        tiny_model,
        "--train_data_dir",
        face_folder,
        "--output_dir",
        output,
        "--resolution",
        "64",
        "--center_crop",
        "--cache_latents",
        "--train_batch_size",
        "2",
        "--rank",
        "4",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--num_validation_images",
        "1",  # and the default prompts: validation needs no flag
    ]
    run = subprocess.run(
        accelerate_launch(args, "--num_processes", "1"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The tiny model's tokenizer knows few words and spells the default prompts in more than CLIP's 77 tokens (SD2.1's
    # own takes them whole): the run says so in one line of its own, and no library repeats it.
    log = run.stderr
    assert sum("CLIP tokens" in line or "sequence length" in line for line in log.splitlines()) == 1
    for noise in ("warn", "[transformers]", "torchvision", "first batch", "checksum", "\x1b[A", "Loading weights"):
        assert noise not in log.lower() if noise == "warn" else noise not in log, (noise, log[-3000:])

    # The grids: the default prompts as columns, labelled with the step, the prompts and the seeds.
    grids = {
        step: np.asarray(Image.open(output / "validation" / f"step-00000{step}.png")).astype(int) for step in (0, 2)
    }
    prompts = json.loads((output / "validation" / "step-000002.json").read_text())["columns (prompts)"]
    assert prompts == finetune_lora.DEFAULT_VALIDATION_PROMPTS
    height, width, _ = grids[2].shape
    top, left = height - 64, width - 4 * 64
    assert top > 0 and left > 0
    header, side = grids[2][:top], grids[2][top:, :left]
    assert header.min() < 100 and side.min() < 100 and header.max() == 255  # dark text on white
    assert np.abs(grids[0][:top] - header).max() > 100  # "step 0" and "step 2"
    assert np.array_equal(grids[0][top:, :left], side)  # the same seed

    # The line before it converts the LoRA with tools/export_kohya.py; the last is a command that samples it.
    assert log.strip().splitlines()[-2] == (
        f"For AUTOMATIC1111 and ComfyUI: python tools/export_kohya.py run.safetensors --lora {output}"
    )
    last = log.strip().splitlines()[-1]
    prefix = f"Next: python generate.py --lora {output / finetune_lora.LORA_WEIGHTS_NAME} --prompt "
    assert last.startswith(prefix), last
    command = shlex.split(last.removeprefix("Next: "))[2:]
    assert command[command.index("--base_model") + 1] == str(tiny_model)
    assert generate.main([*command, "--steps", "2", "--output_dir", str(tmp_path / "images")]) == 0
    [image] = (tmp_path / "images").glob("*.png")
    assert Image.open(image).size == (64, 64)
