"""What generate.py refuses rather than apply in part or write wrong: a LoRA that is not whole, an image that is not
finite, a second run into a folder another run is writing, a damaged image of an earlier run, an incomplete base
model folder; and a prompts file's byte-order mark is no part of its first prompt."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file
from test_generate import PROMPT, run, write_published_layout_lora

import generate

REPO = Path(__file__).resolve().parents[1]
MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def good_lora(tiny_model, tmp_path_factory):
    return write_published_layout_lora(tiny_model, tmp_path_factory.mktemp("lora") / "good.safetensors")


def broken(good: Path, tmp_path: Path, fault: str) -> Path:
    path = tmp_path / f"{fault.replace(' ', '-')}.safetensors"
    if fault == "renamed key":  # one flipped byte in the safetensors header
        path.write_bytes(good.read_bytes().replace(b"attn1.to_q.lora_A.weight", b"attn1.to_q.lora_A.weighu", 1))
        return path
    tensors = load_file(good)
    key = f"{MODULE}.attn1.to_q.lora_A.weight"
    if fault == "missing lora_A":
        del tensors[key]
    elif fault == "NaN":
        tensors[key][0, 0] = float("nan")
    elif fault == "int8":
        tensors[key] = tensors[key].to(torch.int8)
    elif fault == "SDXL keys":
        tensors["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = tensors[key].clone()
    elif fault == "SD 1.x":  # cross-attention that reads CLIP ViT-L's 768 features
        rank = tensors[key].shape[0]
        tensors[f"{MODULE}.attn2.to_k.lora_A.weight"] = torch.zeros(rank, 768)
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing lora_A", f"lacks the down or the up matrix of a module: {MODULE}.attn1.to_q"),
        ("renamed key", f"holds keys that are no UNet or text-encoder LoRA weight: {MODULE}.attn1.to_q.lora_A.weighu"),
        ("SDXL keys", "is an SDXL LoRA (it adapts a second text encoder): text_encoder_2."),
        ("NaN", f"holds NaN or infinite weights: {MODULE}.attn1.to_q.lora_A.weight"),
        ("int8", f"holds torch.int8 weights, not floating point: {MODULE}.attn1.to_q.lora_A.weight"),
        ("SD 1.x", f"is a LoRA for Stable Diffusion 1.x, not Stable Diffusion 2.x: {MODULE}.attn2.to_k"),
    ],
)
def test_a_lora_that_is_not_whole_is_refused_in_one_line_with_nothing_written(
    tiny_model, good_lora, tmp_path, capsys, fault, message
):
    lora = broken(good_lora, tmp_path, fault)
    code, images = run(tiny_model, tmp_path / "out", "--prompt", PROMPT, "--lora", lora)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and images == [] and not (tmp_path / "out").exists()
    assert line.startswith(f"error: LoRA {lora} {message}") and line.endswith(
        "pass a whole LoRA for Stable Diffusion 2.x"
    )


def test_an_image_that_is_not_finite_is_not_written_or_captioned(tiny_model, tmp_path, capsys):
    code, images = run(tiny_model, tmp_path / "out", "--prompt", PROMPT, "--lora", "none", "--guidance_scale", "1e300")
    err = capsys.readouterr().err
    assert code == 1 and images == []
    assert f'error: the image of seed 42 for "{PROMPT}" came out NaN or infinite and was not written' in err
    metadata = tmp_path / "out" / "metadata.jsonl"
    assert not metadata.exists() or metadata.read_text() == ""


def test_a_second_run_into_a_folder_being_written_stops_at_once_and_the_first_is_intact(tiny_model, tmp_path, capsys):
    output = tmp_path / "out"
    flags = ["--base_model", tiny_model, "--height", "64", "--width", "64", "--device", "cpu", "--output_dir", output]
    first = subprocess.Popen(
        [sys.executable, str(REPO / "generate.py"), *map(str, flags), "--prompt", PROMPT, "--lora", "none"]
        + ["--steps", "3", "--num_images", "24", "--batch_size", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not list(output.glob("*.png")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second started"
        assert generate.main([*map(str, flags), "--prompt", PROMPT, "--lora", "none", "--steps", "2"]) == 1
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"error: {output} is being written by another run (process {first.pid}): wait for it to end, or pass "
            "another --output_dir"
        )
    finally:
        stderr = first.communicate(timeout=300)[1]
    assert first.returncode == 0, stderr[-3000:]
    pngs = sorted(output.glob("*.png"))
    assert len(pngs) == 24 and all(json.loads(Image.open(p).text["text2face"])["steps"] == 3 for p in pngs)


def test_a_damaged_image_of_an_earlier_run_is_sampled_again(tiny_model, tmp_path, capsys):
    flags = ["--prompt", PROMPT, "--lora", "none", "--num_images", "2"]
    code, images = run(tiny_model, tmp_path / "out", *flags)
    assert code == 0 and len(images) == 2
    original = images[0].read_bytes()
    images[0].write_bytes(original[: len(original) // 2])  # what a full disk or a crash leaves
    capsys.readouterr()
    code, again = run(tiny_model, tmp_path / "out", *flags)
    assert code == 0 and again == images
    assert f"warning: {images[0]} is damaged" in capsys.readouterr().err
    assert images[0].read_bytes() == original


def test_a_prompts_file_with_a_byte_order_mark_gives_its_first_prompt_without_it(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a smiling face\n", encoding="utf-8-sig")  # as Windows editors save UTF-8
    code, [image] = run(tiny_model, tmp_path / "out", "--prompts_file", prompts, "--lora", "none")
    assert code == 0 and json.loads(Image.open(image).text["text2face"])["prompt"] == "a smiling face"


@pytest.mark.parametrize("part", ["tokenizer", "unet"])
def test_a_base_model_folder_missing_a_part_is_one_line_before_anything_loads(tiny_model, tmp_path, capsys, part):
    model = shutil.copytree(tiny_model, tmp_path / "sd21")
    shutil.rmtree(model / part)
    assert generate.main(["--base_model", str(model), "--prompt", PROMPT, "--lora", "none"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --base_model {model} has no {part}: pass the folder of a diffusers Stable ")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", "abc", "its steps is 'abc': pass --steps, or an unedited PNG"),
        ("guidance_scale", None, "its guidance_scale is None: pass --guidance_scale, or an unedited PNG"),
        ("seed", -1, "seed -1 is out of range"),
        ("dtype", "int4", "its dtype is 'int4': pass --dtype, or an unedited PNG"),
        ("prompt", ["a", "list"], "carries no complete text2face settings"),
        ("loras", "not a list", "carries no complete text2face settings"),
        ("scheduler", "nope", "--scheduler nope: choose one of"),
    ],
)
def test_an_edited_png_is_checked_as_strictly_as_the_flags(tiny_model, tmp_path, capsys, key, value, message):
    code, [image] = run(tiny_model, tmp_path / "first", "--prompt", PROMPT, "--lora", "none")
    settings = json.loads(Image.open(image).text["text2face"]) | {key: value}
    edited = tmp_path / "edited.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("text2face", json.dumps(settings))
    Image.open(image).save(edited, pnginfo=info)
    capsys.readouterr()
    assert generate.main(["--from_png", str(edited), "--output_dir", str(tmp_path / "again")]) != 0
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "again").exists()


def test_from_png_always_renders_into_a_folder_of_its_own_and_says_whether_it_matches(
    tiny_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    flags = ["--base_model", str(tiny_model), "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]
    assert generate.main([*flags, "--prompt", PROMPT, "--lora", "none"]) == 0
    [source] = (tmp_path / "outputs").glob("*/*.png")
    for number in (1, 2):  # the second time too: a render again is never "nothing to sample"
        capsys.readouterr()
        assert generate.main(["--from_png", str(source), "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        again = Path("outputs", "from_png", f"{source.stem}-{number}", source.name)
        assert f"{again} matches {source} pixel for pixel" in out and "nothing to sample" not in out, out
    assert generate.main(["--from_png", str(source), "--device", "cpu", "--steps", "3"]) == 0
    assert f"differs from {source} in " in capsys.readouterr().out


def test_the_base_model_flag_takes_the_training_scripts_spelling_too(tiny_model, tmp_path):
    flags = ["--prompt", PROMPT, "--lora", "none", "--steps", "2", "--height", "64", "--width", "64"]
    args = generate.parse_args([*flags, "--pretrained_model_name_or_path", str(tiny_model)])
    assert args.base_model == str(tiny_model)
