"""A tiny Stable Diffusion 2.1-shaped pipeline and a folder of captioned faces, written to disk.

The models keep SD2.1's architecture choices -- linear transformer projections, cross-attention
modules named `to_q/to_k/to_v/to_out.0`, an upcast-attention UNet, a four-level VAE (8x
downsampling), a CLIP text encoder with `q_proj/k_proj/v_proj/out_proj`, a v-prediction DDIM
scheduler -- at widths that run in milliseconds on a CPU. Everything is saved in the diffusers
layout so the scripts load it through the same `from_pretrained(path)` calls as a Hub id.
"""

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

SD21_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# Short BPE merges over the words our captions and test prompts use most, so that the
# tokenizer behaves like a real CLIP BPE (multi-character tokens, `</w>` word ends).
WORD_MERGES = ["a", "the", "man", "woman", "face", "hair", "smiles", "with", "old", "young", "eyes"]


def bytes_to_unicode():
    """GPT-2/CLIP byte-to-unicode table: every byte maps to a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in characters), strict=True))


def write_clip_tokenizer(folder: Path):
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) covering every byte."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORD_MERGES:
        prefix = word[0]
        for i, char in enumerate(word[1:], start=1):
            suffix = char + "</w>" if i == len(word) - 1 else char
            merges.append(f"{prefix} {suffix}")
            prefix = prefix + suffix
            if prefix not in vocab_tokens:
                vocab_tokens.append(prefix)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "!",
                "model_max_length": 77,
                "do_lower_case": True,
                "add_prefix_space": False,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "!",
            }
        )
    )
    return len(vocab)


def build_tiny_sd21(path, seed: int = 0) -> Path:
    """Save a random-weight SD2.1-shaped StableDiffusionPipeline at `path` and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vocab_size = write_clip_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler.from_config(SD21_SCHEDULER_CONFIG)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


FACE_CAPTIONS = [
    "a young woman with long red hair smiles",
    "an old man with gray hair and a beard",
    "a young man with short black hair, neutral face",
    "a woman with blond hair and blue eyes smiles with visible teeth",
    "an old woman with white hair and glasses",
    "a man with brown hair and a goatee looks angry",
    "a young woman with curly brown hair looks surprised",
    "a bald old man with a wide smile",
]


def draw_face(size: int, index: int) -> Image.Image:
    """A cartoon face whose skin, hair, eye and mouth vary with `index`."""
    skin = [(241, 194, 125), (198, 134, 66), (141, 85, 36), (255, 219, 172)][index % 4]
    hair = [(200, 60, 30), (120, 120, 120), (20, 20, 20), (230, 200, 90), (250, 250, 250), (90, 60, 30)][index % 6]
    background = (40 + 25 * (index % 7), 90, 160 - 15 * (index % 5))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.ellipse([14 * s, 6 * s, 50 * s, 40 * s], fill=hair)
    draw.ellipse([16 * s, 12 * s, 48 * s, 56 * s], fill=skin)
    eye_y = (28 + index % 3) * s
    for eye_x in (24 * s, 40 * s):
        draw.ellipse([eye_x - 3 * s, eye_y - 2 * s, eye_x + 3 * s, eye_y + 2 * s], fill=(255, 255, 255))
        draw.ellipse([eye_x - 1.2 * s, eye_y - 1.2 * s, eye_x + 1.2 * s, eye_y + 1.2 * s], fill=(40, 30, 20))
    smile = index % 2 == 0
    mouth = [25 * s, 40 * s, 39 * s, 49 * s] if smile else [26 * s, 44 * s, 38 * s, 47 * s]
    draw.arc(mouth, 0 if smile else 180, 180 if smile else 360, fill=(150, 30, 40), width=max(1, int(1.5 * s)))
    return image


def make_face_folder(path, count: int = 8, size: int = 64) -> Path:
    """Write `count` face PNGs (two nested folders, as FFHQ's `00000/`) and a metadata.jsonl."""
    path = Path(path)
    records = []
    for index in range(count):
        relative = f"{index // 4:05d}/{index:05d}.png"
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        draw_face(size, index).save(path / relative)
        records.append({"file_name": relative, "text": FACE_CAPTIONS[index % len(FACE_CAPTIONS)]})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_tiny_clip(path, seed: int = 0) -> Path:
    """Save a random-weight CLIPModel (32x32 images in 8x8 patches, the test tokenizer) and its CLIPProcessor at
    `path`, loadable as --score_model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    vocab_size = write_clip_tokenizer(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": vocab_size,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
