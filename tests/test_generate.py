"""generate.py against the tiny SD2.1-shaped pipeline: real LoRA files, real PNGs, real pixels compared."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hub_server import FakeHub
from PIL import Image
from safetensors.torch import load_file, save_file

import generate

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a young woman with long red hair smiles"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_published_layout_lora(model_path, path, rank=4, seed=0):
    """A LoRA file keyed as the published checkpoint: unet.<module>.lora_A/B and
    text_encoder.text_model.encoder.layers.N.self_attn.*_proj.lora_A/B, fp32, no alphas, random nonzero B."""
    pipe = StableDiffusionPipeline.from_pretrained(model_path)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, model, targets in (
        ("unet.", pipe.unet, UNET_TARGETS),
        ("text_encoder.text_model.", pipe.text_encoder, TEXT_ENCODER_TARGETS),
    ):
        for name, module in model.named_modules():
            if name.endswith(targets):
                tensors[f"{prefix}{name}.lora_A.weight"] = (
                    torch.randn(rank, module.in_features, generator=generator) * 0.5
                )
                tensors[f"{prefix}{name}.lora_B.weight"] = (
                    torch.randn(module.out_features, rank, generator=generator) * 0.5
                )
    save_file(tensors, path)
    return path


def write_finetune_layout_lora(model_path, folder, rank=4, seed=1):
    """A LoRA saved the way finetune_lora.py saves it: peft adapters with lora_alpha == rank, written by
    StableDiffusionPipeline.save_lora_weights to folder/pytorch_lora_weights.safetensors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_path)
    torch.manual_seed(seed)
    # init_lora_weights=False draws B at random too, so the adapters change the outputs as a trained LoRA does.
    pipe.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS), init_lora_weights=False)
    )
    pipe.text_encoder.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TEXT_ENCODER_TARGETS), init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        safe_serialization=True,
    )
    return Path(folder)


@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory):
    return write_published_layout_lora(tiny_model, tmp_path_factory.mktemp("lora") / "published.safetensors")


def run(tiny_model, output_dir, *flags):
    """generate.main in this process on the tiny model (2 steps, 64x64, CPU); returns (exit code, PNG paths)."""
    code = generate.main(
        [
            "--base_model",
            str(tiny_model),
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--device",
            "cpu",
            "--output_dir",
            str(output_dir),
            *map(str, flags),
        ]
    )
    return code, sorted(Path(output_dir).glob("*.png")) if Path(output_dir).exists() else []


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def test_lora_and_no_lora_images_differ(tiny_model, lora_file, tmp_path):
    code, lora_images = run(tiny_model, tmp_path / "lora", "--prompt", PROMPT, "--lora", lora_file)
    assert code == 0
    code, base_images = run(tiny_model, tmp_path / "base", "--prompt", PROMPT, "--lora", "none")
    assert code == 0
    assert (
        [p.name for p in lora_images]
        == [p.name for p in base_images]
        == ["00000-s42-a-young-woman-with-long-red-hair-smiles.png"]
    )
    assert np.abs(pixels(lora_images[0]) - pixels(base_images[0])).mean() > 5


def test_images_equal_diffusers_reference_for_the_same_generator_and_lora(tiny_model, lora_file, tmp_path):
    code, images = run(
        tiny_model,
        tmp_path,
        "--prompt",
        PROMPT,
        "--lora",
        lora_file,
        "--lora_scale",
        "0.7",
        "--num_images",
        "2",
        "--batch_size",
        "2",
    )
    assert code == 0 and [p.name[:9] for p in images] == ["00000-s42", "00001-s43"]

    reference = StableDiffusionPipeline.from_pretrained(tiny_model)
    reference.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    for image, seed in zip(images, (42, 43), strict=True):
        expected = reference(
            PROMPT,
            num_inference_steps=2,
            height=64,
            width=64,
            cross_attention_kwargs={"scale": 0.7},
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        assert np.abs(pixels(image) - np.asarray(expected, dtype=np.float64)).mean() < 1.0  # 1/255 per pixel on average
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 5  # image i has its own seed


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_an_image_does_not_depend_on_the_batch_it_was_sampled_in(tiny_model, tmp_path, scheduler):
    flags = [
        "--prompt",
        PROMPT,
        "--prompt",
        "an old man with gray hair",
        "--num_images",
        "2",
        "--lora",
        "none",
        "--scheduler",
        scheduler,
    ]
    _, alone = run(tiny_model, tmp_path / "alone", *flags, "--batch_size", "1")
    _, together = run(tiny_model, tmp_path / "together", *flags, "--batch_size", "3")
    assert [p.name for p in alone] == [p.name for p in together] and len(alone) == 4
    for one, other in zip(alone, together, strict=True):
        assert np.abs(pixels(one) - pixels(other)).mean() < 1.0


def component_outputs(pipe):
    """Text-encoder output for a fixed prompt and UNet output for fixed latents and conditioning."""
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(latents, 500, encoder_hidden_states=conditioning).sample


@pytest.mark.parametrize("layout", ["published", "finetune_lora.py"])
def test_lora_changes_both_unet_and_text_encoder(tiny_model, lora_file, tmp_path, layout):
    if layout == "published":
        path = lora_file
    else:
        path = write_finetune_layout_lora(tiny_model, tmp_path / "trained") / "pytorch_lora_weights.safetensors"
        keys = load_file(path).keys()
        assert any(k.startswith("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
        assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in keys)
    args = generate.parse_args(["--base_model", str(tiny_model), "--lora", str(path)])
    pipe = generate.load_pipeline(args, torch.device("cpu"), torch.float32)
    text_before, unet_before = component_outputs(pipe)
    lora = generate.read_lora(str(path))
    assert lora.layers["unet"] == 4 * 2 * 4  # q, k, v, out of self- and cross-attention in four blocks
    assert lora.layers["text_encoder"] == 4 * 2  # q, k, v, out in two layers
    # LoraSwitch checks that each of these found its layer of the model, and fuses the LoRA.
    generate.LoraSwitch(pipe, {str(path): lora}, {((str(path), 1.0),)})
    text_after, unet_after = component_outputs(pipe)
    assert (text_after - text_before).abs().mean() > 1e-3
    assert (unet_after - unet_before).abs().mean() > 1e-3


def test_from_png_reproduces_the_pixels(tiny_model, lora_file, tmp_path):
    code, (first,) = run(
        tiny_model,
        tmp_path / "a",
        "--prompt",
        PROMPT,
        "--lora",
        lora_file,
        "--seed",
        "7",
        "--scheduler",
        "euler_a",
        "--negative_prompt",
        "blurry, dark",
        "--lora_scale",
        "0.8",
    )
    assert code == 0
    text = Image.open(first).text
    settings = json.loads(text["text2face"])
    assert (
        settings["seed"] == 7 and settings["scheduler"] == "euler_a" and settings["negative_prompt"] == "blurry, dark"
    )
    assert settings["loras"] == [
        {
            "lora": str(lora_file),
            "file": str(lora_file),
            "sha256": generate.read_lora(str(lora_file)).sha256,
            "scale": 0.8,
        }
    ]
    assert text["parameters"].splitlines() == [
        PROMPT,
        "Negative prompt: blurry, dark",
        f"Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: {tiny_model}, "
        f"Lora: {lora_file}, Lora hash: {settings['loras'][0]['sha256'][:12]}, Lora scale: 0.8",
    ]

    assert generate.main(["--from_png", str(first), "--device", "cpu", "--output_dir", str(tmp_path / "b")]) == 0
    (again,) = (tmp_path / "b").glob("*.png")
    assert again.name == first.name
    assert np.array_equal(pixels(again), pixels(first))
    assert json.loads(Image.open(again).text["text2face"]) == settings

    assert (
        generate.main(
            ["--from_png", str(first), "--steps", "3", "--device", "cpu", "--output_dir", str(tmp_path / "c")]
        )
        == 0
    )
    (tweaked,) = (tmp_path / "c").glob("*.png")
    assert json.loads(Image.open(tweaked).text["text2face"]) == {**settings, "steps": 3}
    assert np.abs(pixels(tweaked) - pixels(first)).mean() > 1


def test_from_png_refuses_a_lora_file_that_changed_since(tiny_model, lora_file, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(lora_file.read_bytes())
    code, (image,) = run(tiny_model, tmp_path / "a", "--prompt", PROMPT, "--lora", lora)
    assert code == 0
    write_published_layout_lora(tiny_model, lora, seed=5)  # another LoRA under the same name
    capsys.readouterr()
    assert generate.main(["--from_png", str(image), "--device", "cpu", "--output_dir", str(tmp_path / "b")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: LoRA {lora} has sha256 ") and "but the PNG was made with" in line
    assert not (tmp_path / "b").exists()


def test_from_png_renders_in_the_precision_the_image_was_made_with(tiny_model, tmp_path, capsys):
    code, (first,) = run(tiny_model, tmp_path / "a", "--prompt", PROMPT, "--lora", "none", "--dtype", "bf16")
    assert code == 0
    settings = json.loads(Image.open(first).text["text2face"])
    assert settings["dtype"] == "bfloat16"
    assert generate.main(["--from_png", str(first), "--device", "cpu", "--output_dir", str(tmp_path / "b")]) == 0
    (again,) = (tmp_path / "b").glob("*.png")
    assert json.loads(Image.open(again).text["text2face"])["dtype"] == "bfloat16"
    assert np.array_equal(pixels(again), pixels(first))

    # The same image as if made in fp16 on a GPU: the CPU renders it in fp32 and says so.
    made_on_gpu = tmp_path / "fp16.png"
    Image.open(first).save(made_on_gpu, pnginfo=generate.png_info({**settings, "dtype": "float16"}))
    capsys.readouterr()
    assert generate.main(["--from_png", str(made_on_gpu), "--device", "cpu", "--output_dir", str(tmp_path / "c")]) == 0
    (on_cpu,) = (tmp_path / "c").glob("*.png")
    assert json.loads(Image.open(on_cpu).text["text2face"])["dtype"] == "float32"
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert "made in fp16" in warning and "may differ" in warning


@pytest.mark.parametrize("scheduler", sorted(generate.SCHEDULERS))
def test_every_scheduler_samples_and_is_named_in_the_png(tiny_model, tmp_path, scheduler):
    code, (image,) = run(tiny_model, tmp_path, "--prompt", PROMPT, "--lora", "none", "--scheduler", scheduler)
    assert code == 0 and np.asarray(Image.open(image)).std() > 0
    assert f"Sampler: {generate.SCHEDULERS[scheduler][2]}," in Image.open(image).text["parameters"]


def figure_and_cells(output_dir):
    """The grid figure in output_dir, its record, and {(row, column): the cell's own PNG}."""
    (figure,) = Path(output_dir).glob("*-grid-*.png")
    record = json.loads(Image.open(figure).text["text2face_grid"])
    return figure, record, {(cell["row"], cell["column"]): Path(output_dir) / cell["file"] for cell in record["cells"]}


def check_cells_are_in_the_figure(figure, record):
    """Each cell's PNG is pasted at its box, and the label bands above and left of the cells hold dark text."""
    picture = pixels(figure)
    for cell in record["cells"]:
        left, top, width, height = cell["box"]
        assert np.array_equal(picture[top : top + height, left : left + width], pixels(figure.parent / cell["file"]))
    first = record["cells"][0]["box"]
    assert picture[: first[1]].min() < 128  # title and column labels
    return picture


def test_placeholder_grid_has_labelled_cells_that_from_png_and_a_plain_run_reproduce(tiny_model, lora_file, tmp_path):
    template = "A {age} year old {ethnicity} woman, neutral expression"
    grid_flags = ["--prompt", template, "--grid", "age=20,40", "--grid", "ethnicity=Asian,Black", "--seed", "7"]
    code, images = run(tiny_model, tmp_path / "grid", *grid_flags, "--lora", lora_file)
    assert code == 0 and len(images) == 2 * 2 + 1
    figure, record, cells = figure_and_cells(tmp_path / "grid")
    assert figure.name == "00000-grid-s7-a-age-year-old-ethnicity-woman-neutral-expression.png"
    assert record["command"].startswith("python generate.py --base_model ")
    assert " --grid age=20,40 --grid ethnicity=Asian,Black " in record["command"]
    assert (record["rows"]["labels"], record["columns"]["labels"]) == (
        ["age=20", "age=40"],
        ["ethnicity=Asian", "ethnicity=Black"],
    )
    picture = check_cells_are_in_the_figure(figure, record)
    left, top, width, height = record["cells"][0]["box"]
    assert picture.shape == (top + 2 * 64, left + 2 * 64, 3) and (width, height) == (64, 64)
    assert picture[top:, :left].min() < 128  # row labels
    assert len({pixels(path).tobytes() for path in cells.values()}) == 4  # every cell is its own image

    for (row, column), path in cells.items():
        settings = json.loads(Image.open(path).text["text2face"])
        age, ethnicity = ("20", "40")[row], ("Asian", "Black")[column]
        assert settings["prompt"] == f"A {age} year old {ethnicity} woman, neutral expression"
        assert settings["seed"] == 7 and settings["steps"] == 2
        again = tmp_path / f"again-{row}-{column}"
        assert generate.main(["--from_png", str(path), "--device", "cpu", "--output_dir", str(again)]) == 0
        (rendered,) = again.glob("*.png")
        assert np.array_equal(pixels(rendered), pixels(path))

    written_out = "A 40 year old Asian woman, neutral expression"
    _, (plain,) = run(tiny_model, tmp_path / "plain", "--prompt", written_out, "--seed", "7", "--lora", lora_file)
    assert np.array_equal(pixels(plain), pixels(cells[1, 0]))


def test_compare_is_the_lora_grid_of_the_base_model_and_the_lora(tiny_model, lora_file, tmp_path):
    code, compared = run(tiny_model, tmp_path / "compare", "--compare", "--prompt", PROMPT, "--lora", lora_file)
    assert code == 0
    code, gridded = run(tiny_model, tmp_path / "grid", "--grid", f"lora=none,{lora_file}", "--prompt", PROMPT)
    assert code == 0
    assert [path.name for path in compared] == [path.name for path in gridded] and len(compared) == 3
    for one, other in zip(compared, gridded, strict=True):
        assert np.array_equal(pixels(one), pixels(other))
    figure, record, cells = figure_and_cells(tmp_path / "compare")
    assert record["rows"] is None and record["columns"]["axis"] == "lora"
    assert record["columns"]["labels"] == [Path(tiny_model).name, lora_file.stem]  # the base model, the LoRA
    check_cells_are_in_the_figure(figure, record)

    # Each column is what a plain run of its LoRA gives, bit for bit, although the grid switched LoRAs between them.
    _, (base,) = run(tiny_model, tmp_path / "base", "--prompt", PROMPT, "--lora", "none")
    _, (lora,) = run(tiny_model, tmp_path / "lora", "--prompt", PROMPT, "--lora", lora_file)
    assert np.array_equal(pixels(cells[0, 0]), pixels(base)) and np.array_equal(pixels(cells[0, 1]), pixels(lora))
    assert np.abs(pixels(base) - pixels(lora)).mean() > 5


def test_prompt_with_path_characters_stays_inside_output_dir(tiny_model, tmp_path):
    output_dir = tmp_path / "deep" / "out"
    code, images = run(tiny_model, output_dir, "--prompt", "../../etc/x", "--lora", "none")
    assert code == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("deep"),
        Path("deep/out"),
        Path("deep/out/00000-s42-etc-x.png"),
        Path("deep/out/generate_run.json"),
        Path("deep/out/metadata.jsonl"),
    ]


def test_a_second_run_replaces_nothing_and_writes_only_the_missing_image(tiny_model, tmp_path):
    code, (first, second) = run(tiny_model, tmp_path, "--prompt", PROMPT, "--lora", "none", "--num_images", "2")
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    pixels_before = pixels(second)
    second.unlink()
    code, images = run(tiny_model, tmp_path, "--prompt", PROMPT, "--lora", "none", "--num_images", "2")
    assert code == 0
    assert images == [first, second]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    assert np.array_equal(pixels(second), pixels_before)  # same prompt and seed: the same face


def test_long_prompt_warns_that_its_end_is_cut(tiny_model, tmp_path, capsys):
    prompt = "a young woman with long red hair smiles " * 12 + "and wears a tiny green hat"
    code, images = run(tiny_model, tmp_path, "--prompt", prompt, "--lora", "none")
    assert code == 0 and len(images) == 1
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: prompt")]
    assert len(warning) == 1 and "its end is cut" in warning[0] and "green hat" in warning[0]


def corrupt_lora(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return path


def unmatched_lora(tmp_path, prefix):
    path = tmp_path / "unmatched.safetensors"
    save_file({f"{prefix}.lora_A.weight": torch.ones(4, 32), f"{prefix}.lora_B.weight": torch.ones(32, 4)}, path)
    return path


def plain_png(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


def figure_png(tmp_path):
    path = tmp_path / "figure.png"
    info = generate.PngImagePlugin.PngInfo()
    info.add_text("text2face_grid", json.dumps({"command": "python generate.py --grid seed=1,2", "cells": []}))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


BAD_INPUTS = {
    "empty prompt": (lambda tmp: ["--prompt", "  ", "--lora", "none"], "empty"),
    "no prompt": (lambda tmp: ["--lora", "none"], "no prompt"),
    "size not a multiple of 8": (
        lambda tmp: ["--prompt", PROMPT, "--height", "60", "--lora", "none"],
        "multiples of 8",
    ),
    "steps below 1": (
        lambda tmp: ["--prompt", PROMPT, "--steps", "0", "--lora", "none"],
        "--steps must be from 1 to 1000",
    ),
    "missing LoRA": (
        lambda tmp: ["--prompt", PROMPT, "--lora", str(tmp / "nowhere" / "lora.safetensors")],
        "python download.py",
    ),
    "missing LoRA repo": (
        lambda tmp: ["--prompt", PROMPT, "--lora", "someone/no-such-lora"],
        "which is not in the Hugging Face cache",
    ),
    "corrupt LoRA": (
        lambda tmp: ["--prompt", PROMPT, "--lora", str(corrupt_lora(tmp))],
        "not a readable safetensors file",
    ),
    "LoRA keys for no component": (
        lambda tmp: ["--prompt", PROMPT, "--lora", str(unmatched_lora(tmp, "model.layer"))],
        "holds keys that are no UNet or text-encoder LoRA weight: model.layer",
    ),
    "LoRA keys for no module": (
        lambda tmp: ["--prompt", PROMPT, "--lora", str(unmatched_lora(tmp, "unet.no.such.module"))],
        "does not fit",
    ),
    "missing base model": (
        lambda tmp: ["--prompt", PROMPT, "--lora", "none", "--base_model", str(tmp / "no-model")],
        "no such folder",
    ),
    "output_dir is a file": (
        lambda tmp: ["--prompt", PROMPT, "--lora", "none", "--output_dir", str(plain_png(tmp))],
        "is a file, not a folder",
    ),
    "unknown device": (lambda tmp: ["--prompt", PROMPT, "--lora", "none", "--device", "tpu"], "unknown --device"),
    "absent device": (lambda tmp: ["--prompt", PROMPT, "--lora", "none", "--device", "cuda:7"], "no such CUDA device"),
    "PNG without settings": (lambda tmp: ["--from_png", str(plain_png(tmp))], "carries no complete text2face settings"),
    "grid figure as --from_png": (lambda tmp: ["--from_png", str(figure_png(tmp))], "pass one of its cells"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_nonzero_exit(tiny_model, tmp_path, capsys, case):
    make_flags, message = BAD_INPUTS[case]
    flags = make_flags(tmp_path)
    code, images = run(tiny_model, tmp_path / "out", *flags)
    assert code != 0 and images == []
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


AGED = "A {age} year old woman"
GRID_ERRORS = {
    "missing placeholder value": (["--prompt", AGED, "--grid", "age=20,,60"], "a value of age is missing"),
    "no values": (["--prompt", AGED, "--grid", "age="], "a value of age is missing"),
    "no axis name": (["--prompt", AGED, "--grid", "20,40"], "write AXIS=V1,V2"),
    "unknown axis": (["--prompt", AGED, "--grid", "age=20,40", "--grid", "mood=happy,sad"], "mood: unknown axis"),
    "placeholder with no axis": (["--prompt", AGED, "--grid", "seed=1,2"], "{age} in the prompt has no grid axis"),
    "placeholder in a plain run": (["--prompt", AGED], "{age} in the prompt has no grid axis"),
    "placeholder in the negative prompt": (
        ["--prompt", PROMPT, "--negative_prompt", "{mood}", "--grid", "seed=1,2"],
        "{mood} in the prompt has no grid axis",
    ),
    "more than 64 cells": (
        ["--prompt", AGED, "--grid", "age=" + ",".join(map(str, range(20, 29))), "--grid", "seed=1,2,3,4,5,6,7,8"],
        "the grid has 72 images (1 figure(s) of 9 x 8), more than 64: pass --yes",
    ),
    "more than 64 cells over prompts": (
        ["--prompt", PROMPT, "--prompt", PROMPT, "--num_images", "5", "--grid", "steps=" + ",".join("1234567")],
        "the grid has 70 images",
    ),
    "three axes": (["--prompt", PROMPT, "--grid", "seed=1,2", "--grid", "steps=1,2", "--compare"], "at most two axes"),
    "an axis twice": (["--prompt", PROMPT, "--grid", "seed=1,2", "--grid", "seed=3,4"], "seed is given twice"),
    "compare and a lora axis": (["--prompt", PROMPT, "--compare", "--grid", "lora=none,x"], "lora is given twice"),
    "steps value below 1": (["--prompt", PROMPT, "--grid", "steps=2,0"], "--grid steps must be from 1 to 1000"),
    "steps value over the noise levels": (
        ["--prompt", PROMPT, "--grid", "steps=2,1001"],
        "got 1001 (25 to 50 is usual)",
    ),
    "steps value not a number": (["--prompt", PROMPT, "--grid", "steps=2,many"], "steps takes integers from 1"),
    "guidance value below 0": (["--prompt", PROMPT, "--grid", "guidance_scale=-1"], "not a finite number of 0"),
    "lora_scale value not finite": (["--prompt", PROMPT, "--grid", "lora_scale=1,inf"], "is not finite"),
    "seed value not an integer": (["--prompt", PROMPT, "--grid", "seed=1,2.5"], "seed takes integers"),
    "unknown scheduler value": (["--prompt", PROMPT, "--grid", "scheduler=ddim,heun"], "scheduler takes ddim, dpm++"),
    "compare without a LoRA": (["--prompt", PROMPT, "--compare", "--lora", "none"], "give a --lora other than none"),
    "lora axis beside --lora": (["--prompt", PROMPT, "--lora", "x", "--grid", "lora=none,y"], "drop --lora"),
    "lora_scale axis beside --lora_scale": (
        ["--prompt", PROMPT, "--lora_scale", "0.5", "--grid", "lora_scale=0,1"],
        "drop --lora_scale",
    ),
    "lora_scale axis without a LoRA": (
        ["--prompt", PROMPT, "--lora", "none", "--grid", "lora_scale=0,1"],
        "needs a LoRA to scale",
    ),
    "none beside another LoRA": (["--prompt", PROMPT, "--lora", "none", "--lora", "x"], "drop the other --lora"),
}


@pytest.mark.parametrize("case", GRID_ERRORS)
def test_grid_errors_come_before_any_model_or_lora_is_looked_at(tmp_path, capsys, case):
    flags, message = GRID_ERRORS[case]
    # Neither the base model nor the default LoRA exists here (and the Hub is offline): the grid's own error has
    # to come first, before either is looked for.
    base_model = str(tmp_path / "no-model")
    code = generate.main(["--base_model", base_model, "--output_dir", str(tmp_path / "out"), *flags])
    assert code == 1 and list(tmp_path.iterdir()) == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_a_grid_error_from_the_command_line_is_one_line(scripts, tmp_path):
    result = scripts.run(REPO / "generate.py", ["--prompt", AGED, "--grid", "seed=1,2"], cwd=tmp_path, libraries=True)
    assert result.returncode == 1 and result.stderr.startswith(
        "error: {age} in the prompt has no grid axis: add --grid"
    )
    assert len(result.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", ""], "error: a --prompt is empty"),
        (
            ["--prompt", PROMPT, "--lora", "corrupt.safetensors"],
            "error: LoRA file corrupt.safetensors is not a readable",
        ),
        (["--prompt", PROMPT, "--scheduler", "heun_x"], "error: argument --scheduler: invalid choice: 'heun_x'"),
        (["--prompt", PROMPT, "--steps", "many"], "error: argument --steps: invalid int value: 'many'"),
    ],
)
def test_command_line_errors_print_one_line_and_no_traceback(scripts, tiny_model, tmp_path, flags, message):
    corrupt_lora(tmp_path)
    flags = ["--base_model", str(tiny_model), "--device", "cpu", *flags]
    result = scripts.run(REPO / "generate.py", flags, cwd=tmp_path, libraries=True)
    assert result.returncode != 0
    (line,) = result.stderr.splitlines()
    assert line.startswith(message)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("published", [True, False])
def test_default_lora_is_fetched_from_the_hub_on_first_use(scripts, tiny_model, lora_file, tmp_path, published):
    lora_path = "checkpoints/lora30k/pytorch_lora_weights.safetensors"
    hub = FakeHub()
    if published:
        hub.add_repo("michaeltrs/text2face", {lora_path: lora_file.read_bytes()})
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        result = scripts.run(
            REPO / "generate.py",
            [
                "--base_model",
                str(tiny_model),
                "--prompt",
                PROMPT,
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--device",
                "cpu",
            ],
            cwd=tmp_path,
            env=env,
        )
    finally:
        hub.close()
    assert any(request["path"] == f"/michaeltrs/text2face/resolve/main/{lora_path}" for request in hub.requests)
    fetched = tmp_path / "checkpoints" / "lora30k" / "pytorch_lora_weights.safetensors"
    if published:
        assert result.returncode == 0, result.stderr
        assert fetched.read_bytes() == lora_file.read_bytes()
        (image,) = (tmp_path / "outputs").glob("*/*.png")
        settings = json.loads(Image.open(image).text["text2face"])
        assert [(lora["lora"], lora["sha256"]) for lora in settings["loras"]] == [
            ("checkpoints/lora30k", generate.read_lora(str(lora_file)).sha256)
        ]
    else:
        assert result.returncode != 0 and "Traceback" not in result.stderr
        # check_hub_reachable, the one Hub check of every script, names the repo the Hub does not have
        assert (
            result.stderr.strip().splitlines()[-1].startswith(f"error: no repository michaeltrs/text2face on {hub.url}")
        )
        assert not fetched.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("bad value\nmore detail"), "bad value"),
        (KeyError(), "KeyError"),
        (RuntimeError("  \n"), "RuntimeError"),
        (OSError(28, "No space left on device"), "No space left on device"),
        (OSError("no errno, only text"), "no errno, only text"),
    ],
)
def test_an_error_becomes_one_line_even_when_its_text_is_empty(error, line):
    assert generate.first_line(error) == line
