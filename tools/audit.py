"""Audit a folder that generate.py wrote: who the model draws when the prompt does not say, and whether it copies.

--audit: per group of images (the prompt template before its placeholders are filled; the base model, each LoRA
and strength), the share of faces CLIP reads as each value of an attribute (zero-shot: the most similar of "a photo
of a {value} person" over the values), with 95% Wilson intervals and an evenness (normalized entropy: 1 even, 0 one
value only), as "Stable Bias" (Luccioni et al. 2023). Bare: gender, age and ethnicity in FairFace's categories.
Written into FOLDER: audit.csv (a row per image), audit.json (per group; the texts chosen among), audit.png (bars).

--train_data_dir: each image's nearest training image by cosine similarity of CLIP or DINOv2 image embeddings, the
rank of the pair, a flag at --copy_threshold (Somepalli et al. 2023, Carlini et al. 2023) and, per group, the mean
pairwise similarity of its images (diversity). The training embeddings are cached in FOLDER/train_embeddings.
safetensors, reused for each image of unchanged path, size and modification time. Written into FOLDER:
memorization.csv, memorization.json and memorization.png (the closest pairs).

    python generate.py --compare --prompt "a photo of a person" --num_images 50 --output_dir outputs/neutral
    python tools/audit.py outputs/neutral --audit
    python tools/audit.py outputs/neutral --audit gender=man,woman --audit "age=child,young adult,elderly"
    python tools/audit.py outputs/neutral --train_data_dir ffhq/images --embedding_model facebook/dinov2-base
"""

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_SCORE_MODEL = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14, as tools/score.py
DEFAULT_TEMPLATE = "a photo of a {value} person"  # the text each attribute value is read through
# Bare --audit: FairFace's categories (Karkkainen and Joo 2021), its nine age bins coarsened to five words
DEFAULT_AUDIT = {
    "gender": ["male", "female"],
    "age": ["child", "teenage", "young adult", "middle-aged", "elderly"],
    "ethnicity": ["White", "Black", "Latino Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"],
}
DEFAULT_COPY_THRESHOLD = 0.95  # the CLIP ViT-L/14 image cosine flagged as a copy: a near duplicate (see --help)
PNG_SETTINGS_KEY = "text2face"  # the PNG text entry in which generate.py stores an image's settings as JSON
NO_LORA = "none"  # generate.py's --lora value of the base model alone
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}  # as finetune_lora.py reads
SCORE_BATCH_SIZE = 32  # images, or texts, per forward pass
CACHE_NAME = "train_embeddings.safetensors"  # in FOLDER
CACHE_EVERY = 4096  # training images embedded between two writes of the cache
FONT_SIZE = 11
AUDIT_COLUMNS = ("file", "template", "prompt", "seed", "group", "lora", "lora_scale", "base_model")
COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


class AuditError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (python tools/audit.py --help lists the flags)\n")


def parse_args(argv=None):
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__[__doc__.index("    python") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="the --output_dir of a generate.py run")
    parser.add_argument(
        "--audit",
        action="append",
        nargs="?",
        const="",
        metavar="ATTRIBUTE=V1,V2,...",
        help="an attribute and two or more values to choose among (repeatable); bare: gender, age and ethnicity",
    )
    parser.add_argument(
        "--audit_template", default=DEFAULT_TEMPLATE, help=f"text with {{value}} (default: '{DEFAULT_TEMPLATE}')"
    )
    parser.add_argument(
        "--score_model",
        default=DEFAULT_SCORE_MODEL,
        help=f"Hub id or folder of the transformers CLIP model that judges (default: {DEFAULT_SCORE_MODEL})",
    )
    parser.add_argument("--train_data_dir", type=Path, help="the training image folder (nested folders allowed)")
    parser.add_argument(
        "--embedding_model",
        help="Hub id or folder of a transformers CLIP or DINOv2 model whose image embeddings are compared "
        "(default: --score_model)",
    )
    parser.add_argument(
        "--copy_threshold",
        type=float,
        default=DEFAULT_COPY_THRESHOLD,
        help=f"cosine similarity at or above which a pair is flagged as a copy (default: {DEFAULT_COPY_THRESHOLD}, "
        "meant for CLIP ViT-L/14 as a near-duplicate level, between distinct faces and resized or re-encoded copies; "
        "not calibrated here: see the README to calibrate it, look at memorization.png, set your own for DINOv2)",
    )
    parser.add_argument("--block_size", type=int, default=4096, help="training images compared at once (bounds memory)")
    parser.add_argument(
        "--device", default="auto", help="auto (the default: cuda, else mps, else cpu), cpu, cuda[:N] or mps"
    )
    return parser.parse_args(argv)


def check_args(args) -> dict:
    """The flags' combinations, before anything is read; return the audit's {attribute: [values]}."""
    if args.audit is None and args.train_data_dir is None:
        raise AuditError("nothing to do: pass --audit, --train_data_dir DIR, or both")
    if args.block_size < 1:
        raise AuditError(f"--block_size {args.block_size}: give a positive number")
    if args.audit and "{value}" not in args.audit_template:
        raise AuditError(f"--audit_template {args.audit_template!r} has no {{value}}: e.g. '{DEFAULT_TEMPLATE}'")
    attributes = {}
    for spec in args.audit or []:
        if not spec:
            attributes.update({name: values for name, values in DEFAULT_AUDIT.items() if name not in attributes})
            continue
        name, _, text = (part.strip() for part in spec.partition("="))
        values = list(dict.fromkeys(value.strip() for value in text.split(",") if value.strip()))
        if not re.fullmatch(r"\w+", name) or len(values) < 2 or name in attributes or name in AUDIT_COLUMNS:
            raise AuditError(
                f"--audit {spec}: give a new attribute name (not {', '.join(AUDIT_COLUMNS)}) and two values or more "
                "to choose among, e.g. gender=man,woman"
            )
        attributes[name] = values
    return attributes


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


# Copied from generate.check_writable with GenerateError->AuditError
def check_writable(folder: Path, flag: str):
    """Fail now, before any model is loaded, if `folder` cannot be created or written to; create nothing. A file is
    created and removed in the deepest folder that exists: permission bits say nothing for root or a read-only
    mount."""
    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise AuditError(f"cannot write to {folder}: {existing} is a file, not a folder; pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise AuditError(
            f"cannot write to {folder}: {existing} is not writable ({first_line(error)}); pass another {flag}"
        ) from None


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


# Copied from tools.score.quiet_library_logs
def quiet_library_logs():
    """Keep out of the log what a user cannot act on: transformers' warnings (torchvision missing) unless
    TRANSFORMERS_VERBOSITY asks for them, and, when stderr is no terminal, its loading bars."""
    from transformers.utils import logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        logging.set_verbosity_error()
    if not sys.stderr.isatty():
        logging.disable_progress_bar()


# Copied from tools.score.scoring_device with ScoreRunError->AuditError
def scoring_device(name: str) -> torch.device:
    """The --device: auto is cuda, else mps, else the CPU; any other must exist on this machine."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise AuditError(f"--device {name}: {first_line(error)}: use auto, cpu, cuda, cuda:N or mps") from None
    return device


# Copied from tools.score.lora_columns
def lora_columns(settings) -> dict:
    """The LoRAs of an image as the scores.csv columns lora and lora_scale; none for the base model alone."""
    # PNGs from before several LoRAs held the one LoRA in flat lora_* entries
    flat = [{"lora": settings["lora"], "scale": settings["lora_scale"]}] if settings.get("lora") else []
    loras = settings.get("loras", flat)
    return {
        "lora": " + ".join(entry["lora"] for entry in loras) or NO_LORA,
        "lora_scale": " + ".join(f"{entry['scale']:g}" for entry in loras),
    }


# The models: CLIP (the judge, and an image encoder) and DINOv2 (an image encoder)


def load_model(name: str, flag: str, device: torch.device, text_too: bool) -> tuple:
    """(model, processor): a transformers CLIP model (the only kind with `text_too`) or DINOv2 model, in fp32 on
    every device so that results compare between machines, from its folder, the Hugging Face cache or the Hub."""
    from transformers import AutoModel, AutoProcessor

    kinds = "a transformers CLIP model" + ("" if text_too else " or DINOv2 model")
    folder = Path(name).expanduser() if names_a_folder(name) else None
    if folder is not None and not (folder / "config.json").is_file():
        problem = f"no config.json in {folder}" if folder.is_dir() else f"no such folder: {folder}"
        raise AuditError(f"{flag}: {problem}: pass the folder of {kinds} or a Hub id like {DEFAULT_SCORE_MODEL}")
    for local_files_only in (True, False):  # the cache first; the Hub only for an id that is not cached
        try:
            model, loading = AutoModel.from_pretrained(
                folder or name, dtype=torch.float32, local_files_only=local_files_only, output_loading_info=True
            )
            processor = AutoProcessor.from_pretrained(folder or name, local_files_only=local_files_only)
            break
        except (OSError, ValueError) as error:
            if folder is not None or not local_files_only:
                raise AuditError(
                    f"cannot load {flag} {name} ({first_line(error)}): pass {kinds}, a folder or a Hub id"
                ) from None
    # transformers fills weights a checkpoint lacks with random ones, and says so only in the log quieted
    missing = sorted(key for key in loading["missing_keys"] if text_too or not key.startswith("text"))
    kind = model.config.model_type
    if kind not in (("clip",) if text_too else ("clip", "dinov2")) or missing:
        what = f"incomplete ({len(missing)} weights missing, {missing[0]} first)" if missing else f"a {kind} model"
        tower = "image and text towers" if text_too else "an image encoder"
        raise AuditError(f"{flag} {name} is {what}, without {tower}: pass {kinds} such as {DEFAULT_SCORE_MODEL}")
    return model.eval().to(device), processor


def embed_images(model, processor, paths: list, device) -> torch.Tensor:
    """The image embeddings (CLIP's projected image features, DINOv2's class token) of the images at `paths`, each
    of length 1 so that a dot product is a cosine, SCORE_BATCH_SIZE per forward pass."""
    from tqdm import tqdm

    batches = []
    with torch.inference_mode(), tqdm(total=len(paths), unit="image", disable=None) as bar:
        for start in range(0, len(paths), SCORE_BATCH_SIZE):
            batch = []
            for path in paths[start : start + SCORE_BATCH_SIZE]:
                try:
                    with Image.open(path) as image:
                        batch.append(image.convert("RGB"))
                except OSError as error:  # finetune_lora.py skips such a file, so it was not trained on
                    raise AuditError(f"cannot read {path} ({first_line(error)}): remove it or replace it") from None
            pixels = processor(images=batch, return_tensors="pt").pixel_values.to(device)
            if model.config.model_type == "clip":
                batches.append(model.get_image_features(pixel_values=pixels).pooler_output)
            else:
                batches.append(model(pixel_values=pixels).pooler_output)
            bar.update(len(batch))
    return torch.nn.functional.normalize(torch.cat(batches).float(), dim=-1).cpu()


# The images and their groups, from the settings their PNGs carry


def read_folder(folder: Path) -> dict:
    """{path: settings} of the images of FOLDER that generate.py wrote (grid figures and other PNGs are left out);
    fail now, before a model is loaded, if there are none or the results cannot be written beside them."""
    if not folder.is_dir():
        raise AuditError(f"{folder}: no such folder: pass the --output_dir of a generate.py run")
    check_writable(folder, "FOLDER")
    pngs = sorted(folder.glob("*.png"))
    images = {}
    for path in pngs:
        try:
            with Image.open(path) as image:
                images[path] = json.loads(getattr(image, "text", {})[PNG_SETTINGS_KEY])
        except (OSError, KeyError, TypeError, ValueError):
            pass  # not an image generate.py wrote
    if not images:
        raise AuditError(
            f"{folder}: none of its {len(pngs)} PNG file(s) is an image written by generate.py (with "
            f"{PNG_SETTINGS_KEY} settings): pass the --output_dir of a generate.py run"
        )
    return images


def image_rows(images: dict) -> list:
    """A row per image: file, template (the prompt before its placeholders are filled), prompt, seed, LoRAs (none
    for the base model), base model and group: template and LoRA setting (and base model, where several are)."""
    several_bases = len({settings.get("base_model") for settings in images.values()}) > 1
    rows = []
    for path, settings in images.items():
        row = {"file": path.name, "template": settings.get("template") or settings["prompt"]}
        row |= {"prompt": settings["prompt"], "seed": settings["seed"], **lora_columns(settings)}
        row["base_model"] = settings.get("base_model", "")
        lora = row["lora"] if row["lora"] == NO_LORA else f"{row['lora']} (scale {row['lora_scale']})"
        rows.append({**row, "group": " | ".join([row["template"], lora] + [row["base_model"]] * several_bases)})
    return rows


def groups_of(rows: list) -> dict:
    """{group: its rows}, ordered by template and then as met, so that the base model stands beside its LoRAs."""
    templates = list(dict.fromkeys(row["template"] for row in rows))
    groups = {}
    for row in sorted(rows, key=lambda row: templates.index(row["template"])):
        groups.setdefault(row["group"], []).append(row)
    return groups


# The audit: CLIP's zero-shot reading of each unprompted attribute, and its distribution per group


def audit_images(model, processor, images: dict, texts: dict, device) -> list:
    """The images' rows, each with the value CLIP picks for each attribute: the one whose text is most similar."""
    flat = [text for by_value in texts.values() for text in by_value.values()]
    pictures = embed_images(model, processor, list(images), device)
    with torch.inference_mode():
        tokens = processor.tokenizer(flat, padding=True, truncation=True, return_tensors="pt").to(device)
        features = model.get_text_features(**tokens).pooler_output.float()
    embedded = dict(zip(flat, torch.nn.functional.normalize(features, dim=-1).cpu(), strict=True))
    rows = image_rows(images)
    for row, picture in zip(rows, pictures, strict=True):
        for name, by_value in texts.items():
            similarity = torch.stack([embedded[text] for text in by_value.values()]) @ picture
            row[name] = list(by_value)[int(similarity.argmax())]
    return rows


def wilson_interval(count: int, total: int, z: float = 1.959964) -> tuple:
    """The Wilson score interval (Wilson 1927; 95% for this z) of the share count / total: unlike p +- z sqrt(p(1-p)
    / n), it stays in [0, 1] and is not empty at 0 or n."""
    share = count / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def evenness(counts: list) -> float:
    """Normalized entropy of the counts: 1 when every value is as common, 0 when one value takes all."""
    total = sum(counts)
    return sum(count / total * math.log(total / count) for count in counts if count) / math.log(len(counts))


def summarize_audit(groups: dict, attributes: dict) -> dict:
    """Per group: its template, LoRA and base model, image count and, per attribute, the count, share and 95%
    Wilson interval of each value and the evenness."""
    summary = {}
    for name, members in groups.items():
        group = {key: members[0][key] for key in ("template", "lora", "lora_scale", "base_model")}
        group |= {"images": len(members), "attributes": {}}
        for attribute, values in attributes.items():
            counts = {value: sum(row[attribute] == value for row in members) for value in values}
            group["attributes"][attribute] = {
                "counts": counts,
                "shares": {value: count / len(members) for value, count in counts.items()},
                "intervals": {value: wilson_interval(count, len(members)) for value, count in counts.items()},
                "evenness": evenness(list(counts.values())),
            }
        summary[name] = group
    return summary


def audit_table(summary: dict, attributes: dict) -> str:
    """The summary as text: a line per attribute and group (base model beside LoRA) with shares and evenness."""
    lines = [["attribute", "group", "images", "evenness", "shares (95% interval)"]]
    for attribute in attributes:
        for name, group in summary.items():
            result = group["attributes"][attribute]
            shares = "  ".join(
                f"{value} {result['shares'][value]:.0%} ({low:.0%}-{high:.0%})"
                for value, (low, high) in result["intervals"].items()
            )
            lines.append([attribute, name, str(group["images"]), f"{result['evenness']:.2f}", shares])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join("  ".join(map(str.ljust, line, widths)).rstrip() for line in lines)


def audit_figure(summary: dict, attributes: dict, scorer_name: str, bar: int = 400) -> Image.Image:
    """A block per attribute: its values' colours, then a stacked bar of shares per group (the base model beside
    its LoRAs), each labelled with the group's name and image count."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line, margin = math.ceil(font.size * 1.6), 8
    labels = [f"{name} ({group['images']})" for name, group in summary.items()]
    left = math.ceil(max(font.getlength(label) for label in labels)) + 2 * margin
    legend = max(sum(24 + math.ceil(font.getlength(value)) for value in values) for values in attributes.values())
    height = margin + line * (1 + (2 + len(summary)) * len(attributes))
    figure = Image.new("RGB", (left + max(bar, legend) + 2 * margin, height), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((margin, margin), f"Unprompted attributes as CLIP {scorer_name} reads them", fill="black", font=font)
    y = margin + line
    for attribute, values in attributes.items():
        x = left
        draw.text((margin, y + line / 2), attribute, fill="black", font=font, anchor="lm")
        for number, value in enumerate(values):
            draw.rectangle([x, y + 4, x + 10, y + 14], fill=COLOURS[number % len(COLOURS)])
            draw.text((x + 14, y + 2), value, fill="black", font=font)
            x += 24 + math.ceil(font.getlength(value))
        y += line
        for label, group in zip(labels, summary.values(), strict=True):
            draw.text((margin, y + line / 2), label, fill="black", font=font, anchor="lm")
            x = left
            for number, share in enumerate(group["attributes"][attribute]["shares"].values()):
                width = round(share * bar)
                if width:
                    draw.rectangle([x, y + 2, x + width - 1, y + line - 3], fill=COLOURS[number % len(COLOURS)])
                x += width
            y += line
        y += line
    return figure


# The memorization check: the nearest training image of each generated one, and each group's diversity


def training_files(folder: Path) -> list:
    """[(path relative to the folder, size, modification time in ns)] of every image in the training folder."""
    paths = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    if not paths:
        raise AuditError(
            f"--train_data_dir {folder} is no folder or holds no image: pass the one finetune_lora.py reads"
        )
    return [(path.relative_to(folder).as_posix(), path.stat().st_size, path.stat().st_mtime_ns) for path in paths]


def training_embeddings(model, processor, args, files: list, device) -> torch.Tensor:
    """The training images' embeddings, in the order of `files`: from FOLDER's cache for each image of the path, size
    and modification time it holds for this model and folder, embedded for the others (the cache then rewritten)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    cache_path = args.folder / CACHE_NAME
    owner = {"embedding_model": args.embedding_model, "train_data_dir": str(args.train_data_dir.resolve())}
    cached = {}
    with contextlib.suppress(OSError, SafetensorError, ValueError, KeyError, TypeError):  # none, or another's
        with safe_open(cache_path, "pt") as file:
            metadata = json.loads(file.metadata()["cache"])
            if {key: metadata[key] for key in owner} == owner:
                cached = dict(zip(map(tuple, metadata["files"]), file.get_tensor("embeddings"), strict=True))
    missing = [entry for entry in files if entry not in cached]
    print(f"training embeddings: {len(files) - len(missing)} cached, {len(missing)} to embed")
    for start in range(0, len(missing), CACHE_EVERY):  # the cache written as it grows: a stopped run goes on from it
        chunk = missing[start : start + CACHE_EVERY]
        paths = [args.train_data_dir / name for name, _, _ in chunk]
        cached |= dict(zip(chunk, embed_images(model, processor, paths, device), strict=True))
        done = [entry for entry in files if entry in cached]  # of a removed or changed image, the entry goes
        metadata = {"cache": json.dumps({**owner, "files": done})}
        with atomic_write(cache_path) as staging:
            save_file({"embeddings": torch.stack([cached[entry] for entry in done])}, staging, metadata=metadata)
    return torch.stack([cached[entry] for entry in files])


def nearest_training(generated: torch.Tensor, training: torch.Tensor, block_size: int) -> tuple:
    """(similarity, index): for each generated embedding, its most similar training embedding, by matrix products
    of `block_size` training embeddings at a time, so that memory is bounded by the block, not the training set."""
    best = torch.full((len(generated),), -math.inf)
    index = torch.zeros(len(generated), dtype=torch.long)
    for start in range(0, len(training), block_size):
        similarity, position = (generated @ training[start : start + block_size].T).max(dim=1)
        better = similarity > best
        best[better], index[better] = similarity[better], position[better] + start
    return best, index


def diversity(embeddings: torch.Tensor) -> float | None:
    """The mean cosine similarity of each pair of distinct images (1: one face again and again); None for one."""
    count = len(embeddings)
    return float(((embeddings @ embeddings.T).sum() - count) / (count * (count - 1))) if count > 1 else None


def pairs_figure(rows: list, folder: Path, train_dir: Path, model_name: str, shown=8, thumb=128) -> Image.Image:
    """The `shown` closest pairs, a row each: a generated face beside its nearest training face, similarity under."""
    pairs = sorted(rows, key=lambda row: row["rank"])[:shown]
    font = ImageFont.load_default(size=FONT_SIZE)
    line, margin = math.ceil(font.size * 1.6), 8
    title = f"Closest generated | training pairs, {model_name}"
    width = max(2 * thumb + 3 * margin, math.ceil(font.getlength(title)) + 2 * margin)
    figure = Image.new("RGB", (width, margin + line + len(pairs) * (thumb + line + margin)), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((margin, margin), title, fill="black", font=font)
    for number, row in enumerate(pairs):
        y = margin + line + number * (thumb + line + margin)
        for column, path in enumerate([folder / row["file"], train_dir / row["nearest"]]):
            with Image.open(path) as image:
                figure.paste(image.convert("RGB").resize((thumb, thumb)), (margin + column * (thumb + margin), y))
        label = f"#{row['rank']}  {row['similarity']:.3f}{'  copy?' if row['copied'] else ''}"
        draw.text((margin, y + thumb + 2), label, fill="black", font=font)
    return figure


def write_outputs(folder: Path, stem: str, rows: list, record: dict, figure: Image.Image) -> list:
    """<stem>.csv (the `rows`), <stem>.json (the `record`) and <stem>.png (the `figure`) in `folder`, each written
    whole; return the paths."""
    table, picture = io.StringIO(), io.BytesIO()
    writer = csv.DictWriter(table, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    figure.save(picture, format="PNG")
    contents = [table.getvalue().encode(), (json.dumps(record, indent=2) + "\n").encode(), picture.getvalue()]
    paths = [folder / f"{stem}{suffix}" for suffix in (".csv", ".json", ".png")]
    for path, content in zip(paths, contents, strict=True):
        try:
            with atomic_write(path) as staging:
                staging.write_bytes(content)
        except OSError as error:
            raise AuditError(f"cannot write {path} ({first_line(error)}): free space or make it writable") from None
    return paths


def run_audit(args, attributes: dict, images: dict, device) -> tuple:
    """The audit, printed: ("audit", its rows, its record, its figure)."""
    model, processor = load_model(args.score_model, "--score_model", device, text_too=True)
    # the exact texts each attribute is chosen among, recorded in audit.json
    texts = {
        name: {v: args.audit_template.replace("{value}", v) for v in values} for name, values in attributes.items()
    }
    rows = audit_images(model, processor, images, texts, device)
    summary = summarize_audit(groups_of(rows), attributes)
    print(f"audited {len(rows)} image(s) with {args.score_model}:\n{audit_table(summary, attributes)}")
    record = {"score_model": args.score_model, "images": len(rows), "texts": texts, "groups": summary}
    return "audit", rows, record, audit_figure(summary, attributes, args.score_model)


def run_memorization(args, images: dict, files: list, device) -> tuple:
    """The nearest training image of each generated one and each group's diversity, printed: ("memorization", its
    rows, its record, the figure of the closest pairs)."""
    model, processor = load_model(args.embedding_model, "--embedding_model", device, text_too=False)
    training = training_embeddings(model, processor, args, files, device)
    generated = embed_images(model, processor, list(images), device)
    similarity, index = nearest_training(generated, training, args.block_size)
    ranks = similarity.argsort(descending=True).argsort() + 1  # 1: the closest pair
    rows = image_rows(images)
    for number, row in enumerate(rows):
        row |= {"nearest": files[int(index[number])][0], "similarity": round(float(similarity[number]), 6)}
        row |= {"rank": int(ranks[number]), "copied": bool(similarity[number] >= args.copy_threshold)}
    position = {row["file"]: number for number, row in enumerate(rows)}
    groups = {
        name: {"images": len(members), "diversity": diversity(generated[[position[row["file"]] for row in members]])}
        for name, members in groups_of(rows).items()
    }
    flagged = [row["file"] for row in rows if row["copied"]]
    record = {"embedding_model": args.embedding_model, "train_data_dir": str(args.train_data_dir), "images": len(rows)}
    record |= {"training_images": len(files), "copy_threshold": args.copy_threshold, "copied": flagged}
    record |= {"most_similar": float(similarity.max()), "groups": groups}
    print(f"{len(flagged)} of {len(rows)} image(s) at or above {args.copy_threshold} similarity to a training image")
    for name, group in groups.items():
        print(f"  {name}: {group['images']} image(s), mean pairwise similarity {group['diversity'] or math.nan:.3f}")
    return "memorization", rows, record, pairs_figure(rows, args.folder, args.train_data_dir, args.embedding_model)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        args = parse_args(argv)
        attributes = check_args(args)
        args.embedding_model = args.embedding_model or args.score_model
        quiet_library_logs()
        device = scoring_device(args.device)
        images = read_folder(args.folder)
        files = training_files(args.train_data_dir) if args.train_data_dir is not None else None
        start, results = time.perf_counter(), []
        if attributes:
            results.append(run_audit(args, attributes, images, device))
        if files is not None:
            results.append(run_memorization(args, images, files, device))
        paths = [path for result in results for path in write_outputs(args.folder, *result)]  # all computed first
        print(f"wrote {', '.join(str(path) for path in paths)} in {time.perf_counter() - start:.1f} s")
        return 0
    except AuditError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
