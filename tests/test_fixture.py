"""The tiny SD2.1-shaped fixture loads through `from_pretrained(path)` and samples on CPU."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image


def test_fixture_has_the_diffusers_layout(tiny_model):
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model / component).is_dir()
    scheduler = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["prediction_type"] == "v_prediction"
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["steps_offset"]) == (0.00085, 0.012, 1)


def test_fixture_modules_are_named_as_in_sd21(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    unet_names = {
        name.split(".")[-1] if not name.endswith("to_out.0") else "to_out.0" for name, _ in pipe.unet.named_modules()
    }
    assert {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"} <= unet_names
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    te_names = {name.split(".")[-1] for name, _ in pipe.text_encoder.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "out_proj"} <= te_names
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77


def test_fixture_pipeline_samples_an_image_of_the_requested_size(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe("a young woman smiles", num_inference_steps=2, height=64, width=96, generator=generator).images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (96, 64)
    assert np.asarray(image).std() > 0


def test_face_folder_has_captions_for_every_image(face_folder):
    records = [json.loads(line) for line in (face_folder / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for record in records:
        image = Image.open(face_folder / record["file_name"])
        assert image.size == (64, 64)
        assert record["text"]
