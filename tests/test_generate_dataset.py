"""generate.py making a synthetic dataset (issue 16): `accelerate launch` shards the images between processes, a run
killed with SIGKILL resumes to the same folder, other settings into that folder are refused, and finetune_lora.py
trains on the folder as it is. Real processes over gloo, real PNGs, pixels compared exactly (against one run of
generate.main in this process)."""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import accelerate_launch, train_args

import finetune_lora
import generate

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "a {age} year old {who} smiles"
AGES, WHO, NUM_IMAGES = ["20", "40", "60"], ["man", "woman"], 6
IMAGE_COUNT = len(AGES) * len(WHO) * NUM_IMAGES
TINY_FLAGS = ["--lora", "none", "--steps", "2", "--height", "64", "--width", "64", "--batch_size", "2"]


def dataset_flags(tiny_model, output_dir) -> list:
    """The template with two axes expanded into every combination, NUM_IMAGES seeds each, no figure."""
    grid = ["--grid", f"age={','.join(AGES)}", "--grid", f"who={','.join(WHO)}", "--no_figure"]
    return ["--base_model", tiny_model, "--prompt", TEMPLATE, *grid, "--num_images", NUM_IMAGES, *TINY_FLAGS] + [
        "--output_dir",
        output_dir,
    ]


def env():
    """CPU only, one thread per process: the same thread count in every run keeps float sums identical."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_processes(flags) -> list:
    """`accelerate launch --multi_gpu --num_processes 2` of generate.py: two CPU processes joined over gloo."""
    command = accelerate_launch(flags, "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port())
    command[command.index(str(REPO / "finetune_lora.py"))] = str(REPO / "generate.py")
    return command


def run(command):
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def pngs(folder: Path) -> dict:
    """{file name: pixels} of the PNGs in `folder`."""
    return {path.name: np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))}


def metadata(folder: Path) -> list:
    return sorted((folder / "metadata.jsonl").read_text().splitlines())


def assert_same_images(folder: Path, reference: Path):
    expected = pngs(reference)
    found = pngs(folder)
    assert sorted(found) == sorted(expected)
    assert all(np.array_equal(found[name], expected[name]) for name in expected)
    assert metadata(folder) == metadata(reference)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """One uninterrupted run of the dataset in one process: `generate.main` here, on one thread as the launched
    processes (OMP_NUM_THREADS=1)."""
    output_dir = tmp_path_factory.mktemp("reference") / "synth"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert generate.main(list(map(str, dataset_flags(tiny_model, output_dir)))) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"{IMAGE_COUNT} image(s), 0 of them in {output_dir} already" in stdout.getvalue()
    return output_dir


def test_the_template_expands_into_every_combination_with_its_values_in_the_captions(reference):
    records = [json.loads(line) for line in metadata(reference)]
    assert len(records) == IMAGE_COUNT == len(pngs(reference))
    assert sorted(os.listdir(reference)) == sorted([*pngs(reference), "generate_run.json", "metadata.jsonl"])
    combinations = {(record["age"], record["who"], record["seed"]) for record in records}
    assert combinations == {(age, who, 42 + image) for age in AGES for who in WHO for image in range(NUM_IMAGES)}
    for record in records:
        assert record["text"] == f"a {record['age']} year old {record['who']} smiles"
        assert record["file_name"].endswith(f"-s{record['seed']}-a-{record['age']}-year-old-{record['who']}-smiles.png")
        settings = json.loads(Image.open(reference / record["file_name"]).text[generate.PNG_SETTINGS_KEY])
        assert settings["prompt"] == record["text"] and settings["seed"] == record["seed"]
        assert settings["placeholders"] == {"age": record["age"], "who": record["who"]}


def test_two_processes_write_the_same_files_and_pixels_as_one(tiny_model, reference, tmp_path):
    output_dir = tmp_path / "synth"
    result = run(two_processes(dataset_flags(tiny_model, output_dir)))
    assert f"the other {IMAGE_COUNT} on 2 process(es)" in result.stdout
    assert f"{IMAGE_COUNT} captioned image(s) in {output_dir / 'metadata.jsonl'}" in result.stdout
    assert result.stdout.rstrip().endswith("--resolution 64")  # the 64 px images trained at their size
    assert_same_images(output_dir, reference)


def descendants(pid: int) -> list:
    """The processes under `pid`, children first: torchrun starts each worker in a session of its own."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = task / "children"
        for child in map(int, children.read_text().split() if children.exists() else []):
            found += [child, *descendants(child)]
    return found


def test_a_run_killed_with_sigkill_resumes_to_the_folder_of_an_uninterrupted_run(tiny_model, reference, tmp_path):
    output_dir = tmp_path / "synth"
    command = two_processes(dataset_flags(tiny_model, output_dir))
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True
    )
    try:
        while len(list(output_dir.glob("*.png"))) < 3 and process.poll() is None:
            time.sleep(0.01)
        for pid in [process.pid, *descendants(process.pid)]:  # the launcher and both of its processes
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    killed = len(list(output_dir.glob("*.png")))
    assert 3 <= killed < IMAGE_COUNT, "the run ended before it could be killed mid-way"

    result = run(command)
    assert f"{IMAGE_COUNT} image(s), {killed} of them in {output_dir} already" in result.stdout
    assert_same_images(output_dir, reference)
    assert len(metadata(output_dir)) == IMAGE_COUNT
    assert sorted(os.listdir(output_dir)) == sorted(os.listdir(reference))  # no temporary file, no duplicate


def listing(folder: Path) -> list:
    return sorted((path.name, path.stat().st_mtime_ns, path.stat().st_size) for path in folder.iterdir())


def test_other_settings_into_the_folder_are_refused_in_one_line_and_nothing_is_written(
    tiny_model, reference, tmp_path, capsys
):
    output_dir = shutil.copytree(reference, tmp_path / "synth")
    before = listing(output_dir)
    flags = [*dataset_flags(tiny_model, output_dir), "--steps", "3", "--seed", "7", "--device", "cpu"]
    assert generate.main(flags) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --output_dir {output_dir} holds a run with other settings (seed 7 here, 42 there;")
    assert "steps 3 here, 2 there" in line and "pass a new --output_dir" in line
    assert listing(output_dir) == before
    assert generate.main([*dataset_flags(tiny_model, output_dir), "--prompt", "an old man", "--device", "cpu"]) == 1
    assert "(prompts: 2 here, 1 there)" in capsys.readouterr().err
    assert generate.setting_difference("loras", [["ab" * 32, 0.5]], [["ab" * 32, 1.0]]) == (
        "lora scale 0.5 here, 1.0 there"
    )

    # The same settings with another batch size, device and spelling of the model's folder are the same run:
    # nothing is left to sample.
    same = [*dataset_flags(tiny_model, output_dir), "--batch_size", "3", "--device", "cpu"]
    same += ["--base_model", f"{tiny_model}/"]
    assert generate.main(same) == 0
    assert f"nothing to sample: all {IMAGE_COUNT} image(s) of this run are in {output_dir}" in capsys.readouterr().out
    assert [entry for entry in listing(output_dir) if entry[0] != "metadata.jsonl"] == [
        entry for entry in before if entry[0] != "metadata.jsonl"
    ]
    assert metadata(output_dir) == metadata(reference)


def test_finetune_trains_on_the_folder_with_no_extra_flags(tiny_model, reference, tmp_path, caplog):
    output = tmp_path / "lora"
    with caplog.at_level("INFO", logger="finetune_lora"):
        assert (
            finetune_lora.main(list(map(str, train_args(tiny_model, reference, output, "--max_train_steps", "2")))) == 0
        )
    assert f"{IMAGE_COUNT} images found under {reference}, {IMAGE_COUNT} with captions" in caplog.text
    assert (output / "pytorch_lora_weights.safetensors").is_file()


def test_jsonl_prompts_carry_their_own_seed_and_negative_prompt(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "an old man", "seed": 7, "negative_prompt": "glasses"})
        + "\n\n"
        + json.dumps({"prompt": "a young woman"})
        + "\n"
    )
    output_dir = tmp_path / "synth"
    flags = ["--base_model", tiny_model, "--prompts_file", prompts, "--num_images", "2", *TINY_FLAGS, "--device", "cpu"]
    assert generate.main([*flags, "--output_dir", output_dir]) == 0
    names = sorted(pngs(output_dir))
    assert names == ["00000-s7-an-old-man.png", "00001-s8-an-old-man.png"] + [
        "00002-s42-a-young-woman.png",
        "00003-s43-a-young-woman.png",
    ]
    negative = {
        name: json.loads(Image.open(output_dir / name).text[generate.PNG_SETTINGS_KEY])["negative_prompt"]
        for name in names
    }
    assert list(negative.values()) == ["glasses", "glasses", "", ""]
    records = [json.loads(line) for line in (output_dir / "metadata.jsonl").read_text().splitlines()]
    assert [(record["file_name"], record["text"], record["seed"]) for record in records] == [
        ("00000-s7-an-old-man.png", "an old man", 7),
        ("00001-s8-an-old-man.png", "an old man", 8),
        ("00002-s42-a-young-woman.png", "a young woman", 42),
        ("00003-s43-a-young-woman.png", "a young woman", 43),
    ]

    prompts.write_text('{"prompt": "an old man"}\n{"prompt": "a child", "seed": "7"}\n')
    capsys.readouterr()
    assert generate.main([*flags, "--output_dir", tmp_path / "bad"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"error: --prompts_file {prompts} line 2: seed must be an integer, got '7'"
    assert not (tmp_path / "bad").exists()


def test_without_output_dir_each_command_gets_its_own_folder_and_a_rerun_adds_nothing(
    tiny_model, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    flags = ["--base_model", tiny_model, "--prompt", "an old man", *TINY_FLAGS, "--device", "cpu"]
    assert generate.main(flags) == 0
    (folder,) = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("an-old-man-") and [p.name for p in folder.glob("*.png")] == [
        "00000-s42-an-old-man.png"
    ]
    before = listing(folder)
    capsys.readouterr()
    assert generate.main(flags) == 0
    assert "nothing to sample: all 1 image(s) of this run are in" in capsys.readouterr().out
    assert [entry for entry in listing(folder) if entry[0] != "metadata.jsonl"] == [
        entry for entry in before if entry[0] != "metadata.jsonl"
    ]
    assert generate.main([*flags, "--seed", "7"]) == 0
    assert len(list((tmp_path / "outputs").iterdir())) == 2


def test_two_processes_draw_each_grid_figure_once_from_the_cells_of_both(tiny_model, tmp_path):
    output_dir = tmp_path / "grid"
    grid = ["--grid", "age=20,40", "--grid", "who=man,woman", "--num_images", "2"]
    run(
        two_processes(
            ["--base_model", tiny_model, "--prompt", TEMPLATE, *grid, *TINY_FLAGS, "--output_dir", output_dir]
        )
    )
    figures = sorted(output_dir.glob("*-grid-*.png"))
    assert [path.name for path in figures] == [
        "00000-grid-s42-a-age-year-old-who-smiles.png",
        "00001-grid-s43-a-age-year-old-who-smiles.png",
    ]
    for figure in figures:
        cells = json.loads(Image.open(figure).text[generate.PNG_GRID_KEY])["cells"]
        assert len(cells) == 4 and all((output_dir / cell["file"]).is_file() for cell in cells)
    captioned = {json.loads(line)["file_name"] for line in metadata(output_dir)}
    assert captioned == {path.name for path in output_dir.glob("*.png")} - {path.name for path in figures}


def test_no_figure_lifts_the_size_limit_of_a_figure(tiny_model):
    flags = ["--base_model", str(tiny_model), "--prompt", TEMPLATE, "--grid", "age=" + ",".join(map(str, range(9)))]
    flags += ["--grid", "who=" + ",".join(f"w{number}" for number in range(8)), "--lora", "none"]
    for extra, refused in (([], True), (["--no_figure"], False)):
        args = generate.parse_args([*flags, *extra])
        prompts = generate.read_prompts(args)
        if refused:
            with pytest.raises(generate.GenerateError, match="more than 64: pass --yes"):
                generate.plan(args, prompts)
        else:
            generate.plan(args, prompts)


def test_no_figure_without_a_grid_is_refused(capsys):
    assert generate.main(["--prompt", "a face", "--no_figure"]) == 1
    assert "error: --no_figure expands the --grid values into images without a figure: add --grid" in (
        capsys.readouterr().err
    )


def test_three_axes_with_no_figure_expand_into_every_combination(tiny_model, tmp_path, capsys):
    output_dir = tmp_path / "synth"
    grid = ["--grid", "age=20,40", "--grid", "who=man,woman", "--grid", "mood=happy,sad"]
    flags = ["--base_model", tiny_model, "--prompt", "a {age} year old {who}, {mood}", *grid, *TINY_FLAGS]
    flags += ["--device", "cpu", "--output_dir", output_dir]
    assert generate.main(flags) == 1  # a figure has rows and columns only
    assert "a grid figure has at most two axes" in capsys.readouterr().err and not output_dir.exists()
    assert generate.main([*flags, "--no_figure"]) == 0
    records = [json.loads(line) for line in metadata(output_dir)]
    assert {(record["age"], record["who"], record["mood"]) for record in records} == {
        (age, who, mood) for age in ("20", "40") for who in ("man", "woman") for mood in ("happy", "sad")
    }
    assert all(record["text"] == f"a {record['age']} year old {record['who']}, {record['mood']}" for record in records)
    assert len(records) == len(pngs(output_dir)) == 8


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path):
    def write_to_a_full_disk(temporary):
        temporary.write_text("")
        with open("/dev/full", "w") as full:  # a real ENOSPC from the kernel
            full.write("x" * 10_000)
            full.flush()

    with pytest.raises(generate.GenerateError) as error:
        generate.write_new_file(tmp_path / "00000-s42-a-face.png", write_to_a_full_disk)
    assert str(error.value) == (
        f"cannot write {tmp_path / '00000-s42-a-face.png'} (No space left on device): free space, then run the same "
        "command again to finish"
    )
    assert list(tmp_path.iterdir()) == []


def test_file_names_sort_past_99999_images():
    assert [generate.ordinal_width(count) for count in (1, 100_000, 100_001, 1_000_001)] == [5, 5, 6, 7]


@pytest.mark.parametrize(
    "prompts, flags, line",
    [
        (None, ["--seed", "-1"], "error: --seed: seed -1 is out of range: give an integer from 0 to "),
        (None, ["--seed", str(2**64 - 1)], "error: --seed: seed 18446744073709551615 is out of range"),
        ('{"prompt": "a face", "seed": 100000000000000000000000}', [], "error: --prompts_file {} line 1: seed 1"),
    ],
)
def test_a_seed_out_of_torch_range_is_one_line_naming_it_before_anything_is_written(
    prompts, flags, line, tmp_path, capsys
):
    output_dir = tmp_path / "synth"
    source = ["--prompt", "a face"]
    if prompts is not None:
        (tmp_path / "prompts.jsonl").write_text(prompts + "\n")
        source = ["--prompts_file", tmp_path / "prompts.jsonl"]
    assert generate.main([*source, *flags, "--num_images", "2", "--output_dir", output_dir]) == 1
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(line.format(tmp_path / "prompts.jsonl")) and not output_dir.exists()
