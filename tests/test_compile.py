"""--compile in generate.py and finetune_lora.py against their eager runs, on the tiny model on the CPU.

Compiling takes about a minute per model here (seconds once Inductor's on-disk cache holds the graphs), so each
script gets one test that makes every check on the same few runs. Both are marked slow: `python -m pytest -m slow`
runs them, the default run skips them.

Tolerances. Inductor fuses operations and reorders float32 sums (GroupNorm, softmax, matmul epilogues), so a
compiled forward differs from the eager one by a few float32 roundings (about 1e-7 relative), not more:
- images: after 3 denoising steps and rounding to 8 bits, a pixel can only flip by one level where its value lay
  within that distance of a rounding boundary; we allow at most 2 levels anywhere and a mean difference of 0.05
  level (measured: at most 1 level, mean 0.001), while two seeds differ by about 40 levels on average;
- LoRA weights after 3 AdamW steps: each step moves a weight by at most about the learning rate (1e-3), so the
  run moves it by up to 3e-3; we allow 3e-5, a hundredth of that (measured: 1.3e-6). A gradient that compiles to
  zero (Inductor's layout optimization does that to the mid block's LoRA) leaves its weights 3e-3 off.
A compiled run reproduces itself exactly: --from_png and resuming are compared for equality.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from test_generate import write_published_layout_lora
from train_helpers import lora, one_thread, train_args  # noqa: F401  (one_thread: autouse fixture)

import finetune_lora
import generate

LEARNING_RATE = 1e-3
STEPS = 3


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def png_settings(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text[generate.PNG_SETTINGS_KEY])


@pytest.mark.slow
def test_generate_compile_matches_eager_is_recorded_and_from_png_reproduces_it(tiny_model, tmp_path, capsys):
    lora_file = write_published_layout_lora(tiny_model, tmp_path / "lora.safetensors")
    # A trained LoRA changes the weights by a few percent. The fixture's (A and B of 0.5 x randn) changes the tiny
    # random model beyond recognition and turns it chaotic: with it, compiled and eager pixels differed by 0.19 levels
    # on average (at most 2); with one of this size, by under 0.001 (at most 1).
    save_file({key: value * 0.02 for key, value in load_file(lora_file).items()}, lora_file)
    flags = ["--base_model", str(tiny_model), "--lora", str(lora_file), "--prompt", "a face", "--num_images", "2"]
    flags += ["--steps", "3", "--height", "64", "--width", "64", "--device", "cpu"]
    assert generate.main([*flags, "--batch_size", "auto", "--output_dir", str(tmp_path / "eager")]) == 0
    assert "batch size 1" in capsys.readouterr().out  # auto is 1 off CUDA
    # The same batch size: a batch of two rounds differently from two batches of one, compiled or not.
    assert generate.main([*flags, "--batch_size", "1", "--compile", "--output_dir", str(tmp_path / "compiled")]) == 0
    out = capsys.readouterr().out
    assert "compiled the UNet and the VAE decoder in" in out

    eager = sorted((tmp_path / "eager").glob("*.png"))
    compiled = sorted((tmp_path / "compiled").glob("*.png"))
    assert [p.name for p in eager] == [p.name for p in compiled] and len(eager) == 2
    for eager_png, compiled_png in zip(eager, compiled, strict=True):
        difference = np.abs(pixels(eager_png) - pixels(compiled_png))
        assert difference.max() <= 2 and difference.mean() <= 0.05, (difference.max(), difference.mean())
        assert png_settings(compiled_png)["compile"] is True
        assert png_settings(eager_png)["compile"] is False
    # The tolerance is far below what tells two images apart.
    assert np.abs(pixels(eager[0]) - pixels(eager[1])).mean() > 10

    assert generate.main(["--from_png", str(compiled[1]), "--output_dir", str(tmp_path / "again")]) == 0
    assert "compiled the UNet and the VAE decoder in" in capsys.readouterr().out
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(pixels(again), pixels(compiled[1]))
    assert png_settings(again) == png_settings(compiled[1])


@pytest.mark.slow
def test_finetune_compile_trains_as_eager_saves_the_same_keys_and_resumes_exactly(tiny_model, face_folder, tmp_path):
    def run(output, *extra):
        flags = ["--train_text_encoder", "--cache_latents", "--learning_rate", LEARNING_RATE, "--seed", "0"]
        flags += ["--max_train_steps", STEPS, "--checkpointing_steps", "2", *extra]
        # Rank 8 as in bench_gpu.py --config tiny: one graph, compiled once per test run.
        flags += ["--rank", "8", "--text_encoder_rank", "8"]
        assert finetune_lora.main(train_args(tiny_model, face_folder, output, *flags)) == 0
        return lora(output)

    eager = run(tmp_path / "eager")
    # Validation keeps the VAE decoder after the latents are cached, and samples with the compiled UNet run eagerly.
    validation = ["--validation_prompts", "a face", "--num_validation_images", "1"]
    compiled = run(tmp_path / "compiled", "--compile", *validation)
    resumed = run(tmp_path / "resumed", "--compile", "--resume_from_checkpoint", tmp_path / "compiled" / "checkpoint-2")

    checkpoint = load_file(tmp_path / "compiled" / "checkpoint-2" / finetune_lora.LORA_WEIGHTS_NAME)
    assert eager.keys() == compiled.keys() == resumed.keys() == checkpoint.keys()
    assert not [key for key in compiled if "_orig_mod" in key]
    assert any(key.startswith("text_encoder.") for key in compiled)
    mid_block = [key for key in compiled if key.startswith("unet.mid_block.") and "lora_B" in key]
    assert mid_block
    for key in mid_block:  # B starts at zero: a zero gradient would leave it there
        assert compiled[key].abs().max() > LEARNING_RATE / 2, key
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=STEPS * LEARNING_RATE / 100, rtol=0, msg=key)
        torch.testing.assert_close(resumed[key], compiled[key], atol=0, rtol=0, msg=key)
    assert json.loads((tmp_path / "resumed" / "training_settings.json").read_text())["global_step"] == STEPS
    assert len(list((tmp_path / "compiled" / "validation").glob("step-*.png"))) == 2  # step 0 and the last step


@pytest.mark.parametrize("keep_decoder", [False, True])
def test_the_vae_is_freed_once_latents_are_cached_but_validation_keeps_its_decoder(tiny_model, keep_decoder):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    latents = torch.randn(1, vae.config.latent_channels, 8, 8)
    finetune_lora.release_vae(vae, keep_decoder=keep_decoder)
    assert all(p.is_meta for p in vae.encoder.parameters())
    assert all(p.is_meta != keep_decoder for p in vae.decoder.parameters())
    assert vae.config.scaling_factor  # the loss still reads it
    if keep_decoder:
        assert torch.isfinite(vae.decode(latents).sample).all()


@pytest.mark.parametrize(
    "grid", [["--compare"], ["--grid", "lora_scale=0.5,1"], ["--grid", "lora=none,other.safetensors"]]
)
def test_generate_compile_is_refused_with_grids_that_switch_loras(grid, capsys):
    assert generate.main(["--prompt", "a face", *grid, "--compile"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --compile compiles the model with the LoRA fused in") and "\n" not in error
