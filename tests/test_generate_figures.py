"""generate.py's figures and run output a reader can read (issue 22, items 7 and 8): labels keep their axis name, a
LoRA is shown by its folder's name, --compare's images say which model made them, the bar stays whole, --help ends
with the examples, and --variant is free text as in diffusers and finetune_lora.py.

Real runs on the tiny SD2.1-shaped pipeline, real figures, files and printed lines; nothing is mocked.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont
from test_generate import PROMPT, REPO, pixels, run, write_published_layout_lora

import generate

TINY_FLAGS = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]


def test_a_label_too_wide_keeps_its_axis_name_and_wraps_or_cuts_only_the_value():
    font = ImageFont.load_default(size=11)
    assert generate.label_lines("age=20", font, 64) == ["age=20"]
    for label in ("ethnicity=Latina", "guidance_scale=7.5", "lora_scale=0.25", "hair=long red curly hair"):
        lines = generate.label_lines(label, font, 64)
        name, value = label.split("=", 1)
        assert any("".join(lines[:count]) == f"{name}=" for count in range(1, len(lines)))  # a line of its own
        assert "".join(lines).replace(" ", "") == label.replace(" ", "")  # nothing lost, wrapped only
        assert all(font.getlength(line) <= 64 for line in lines)
    long = "who=" + "a very long description of a face " * 4
    lines = generate.label_lines(long, font, 64)
    assert lines[0] == "who=" and len(lines) == 1 + 3 and lines[-1].endswith("...")
    assert not any(line.startswith("...") for line in lines)


def test_a_grid_figure_draws_the_axis_name_and_the_value_on_lines_of_their_own(tiny_model, tmp_path):
    grid = ["--prompt", "A {ethnicity} woman", "--grid", "ethnicity=Asian,Latina", "--lora", "none"]
    code, _ = run(tiny_model, tmp_path / "grid", *grid)
    assert code == 0
    (figure,) = (tmp_path / "grid").glob("*-grid-*.png")
    record = json.loads(Image.open(figure).text[generate.PNG_GRID_KEY])
    assert record["columns"]["labels"] == ["ethnicity=Asian", "ethnicity=Latina"]  # whole, as given
    picture = pixels(figure)
    left, top, width, _ = record["cells"][0]["box"]
    # font 11 px, lines 14 px, margin 4 px at 64 px cells: "ethnicity=" on one line, the value on the next
    font = ImageFont.load_default(size=11)
    assert generate.label_lines("ethnicity=Latina", font, width - 4) == ["ethnicity=", "Latina"]
    for column in range(2):
        x = left + column * width
        name_line, value_line = picture[top - 32 : top - 18, x : x + width], picture[top - 18 : top - 4, x : x + width]
        assert name_line.min() < 128 and value_line.min() < 128


def copy_as_checkpoint(lora_file, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(lora_file, folder / generate.DEFAULT_LORA_WEIGHT_NAME)
    return folder


def test_a_lora_is_labelled_by_its_folder_or_file_name(tmp_path):
    weights = generate.DEFAULT_LORA_WEIGHT_NAME
    folder = tmp_path / "my-run" / "checkpoint-500"
    folder.mkdir(parents=True)
    (folder / weights).write_bytes(b"")
    assert generate.lora_label(str(folder), weights) == "checkpoint-500"
    assert generate.lora_label(str(folder / weights), weights) == "checkpoint-500"
    assert generate.lora_label(str(tmp_path / "published.safetensors"), weights) == "published"
    assert generate.lora_label("someone/face-lora", weights) == "someone/face-lora"  # a Hub id
    assert generate.lora_label(generate.DEFAULT_LORA, weights) == "Text2Face LoRA"


def test_compare_names_base_and_lora_images_apart_and_suggests_no_training_on_the_mix(tiny_model, tmp_path, capsys):
    published = write_published_layout_lora(tiny_model, tmp_path / "published.safetensors")
    checkpoint = copy_as_checkpoint(published, tmp_path / "my-run" / "checkpoint-500")
    capsys.readouterr()
    code, images = run(tiny_model, tmp_path / "compare", "--compare", "--prompt", PROMPT, "--lora", checkpoint)
    assert code == 0
    out = capsys.readouterr().out
    figure, *cells = images
    names = [path.name for path in cells]
    assert names == [
        "00000-s42-a-young-woman-with-long-red-hair-smiles-base.png",
        "00001-s42-a-young-woman-with-long-red-hair-smiles-checkpoint-500.png",
    ]
    record = json.loads(Image.open(figure).text[generate.PNG_GRID_KEY])
    assert record["columns"]["labels"] == [Path(tiny_model).name, "checkpoint-500"]
    captions = [json.loads(line) for line in (tmp_path / "compare" / "metadata.jsonl").read_text().splitlines()]
    assert [(caption["file_name"], caption["lora"]) for caption in captions] == [
        (names[0], "none"),
        (names[1], f"{checkpoint}:1"),
    ]
    last = out.strip().splitlines()[-1]
    assert "finetune_lora.py" not in out and "to train on them" not in out
    assert last.startswith(f"2 captioned image(s) in {tmp_path / 'compare' / 'metadata.jsonl'}, made by 2 models")
    assert last.endswith("train on the images of one of them, not this folder")
    assert np.abs(pixels(cells[0]) - pixels(cells[1])).mean() > 5  # the two models' images differ

    # A run of one LoRA is one model: its metadata names it and the run suggests training on the folder.
    code, (image,) = run(tiny_model, tmp_path / "one", "--prompt", PROMPT, "--lora", published)
    assert code == 0 and image.name == "00000-s42-a-young-woman-with-long-red-hair-smiles.png"
    (caption,) = [json.loads(line) for line in (tmp_path / "one" / "metadata.jsonl").read_text().splitlines()]
    assert caption["lora"] == f"{published}:1"
    assert "to train on them: accelerate launch finetune_lora.py" in capsys.readouterr().out


def test_no_line_breaks_the_images_bar(tiny_model, tmp_path):
    """stdout and stderr in one pipe, unbuffered, as a terminal shows them: every line printed during the run (each
    image written, the figure) stands on a line of its own, never glued to a redraw of the bar."""
    flags = ["--base_model", tiny_model, "--prompt", "A {age} year old", "--grid", "age=20,40", "--lora", "none"]
    result = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), *map(str, flags), *TINY_FLAGS, "--output_dir", tmp_path / "out"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", result.stdout) if piece.strip()]
    wrote = [piece for piece in pieces if "wrote " in piece]
    assert len(wrote) == 3 and all(piece.startswith("wrote ") for piece in wrote)  # two cells and the figure
    assert all(piece.startswith("images:") for piece in pieces if "images:" in piece)


def test_help_ends_with_the_docstrings_examples(scripts, tmp_path):
    result = scripts.run(REPO / "generate.py", ["--help"], cwd=tmp_path, libraries=True)
    assert result.returncode == 0
    examples = generate.__doc__.split("\n\n", 1)[1].strip()
    assert result.stdout.strip().endswith(examples.splitlines()[-1].strip())
    assert "python generate.py --prompt" in result.stdout.split("options:")[-1]


def test_variant_is_free_text_as_in_diffusers_and_finetune_lora(tiny_model, tmp_path, capsys):
    assert generate.parse_args(["--prompt", PROMPT, "--variant", "bf16"]).variant == "bf16"
    capsys.readouterr()
    code, _ = run(tiny_model, tmp_path / "out", "--prompt", PROMPT, "--lora", "none", "--variant", "nosuch")
    assert code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot load --base_model {tiny_model}: ") and "nosuch" in line
    assert generate.parse_args(["--prompt", PROMPT]).seed == 42
