"""Score the faces in a folder that generate.py wrote: how well each follows its prompt, judged by CLIP.

Each image's CLIP score against its prompt (Hessel et al. 2021, as torchmetrics' CLIPScore: 100 * max(cosine, 0))
and, for each {placeholder} axis of its grid with two values or more, the value CLIP picks (the prompt filled with
each value in turn: the most similar wins), all read from the settings each PNG carries (its "text2face" entry).
Written into FOLDER: scores.csv (a row per image), scores.json (per LoRA setting, and per value of any sampling
setting that varies: the mean CLIP score, the agreement per axis and per value asked, the confusion tables) and
scores.png (those tables as heat maps); the summary is printed as a table. Scoring again with the same
--score_model replaces its scores.*, each file in one step; another model writes scores-2.* beside them.

    python generate.py --compare --prompt "A photo of a {ethnicity} woman" --grid ethnicity=Asian,Black,White \
        --output_dir outputs/agreement
    python tools/score.py outputs/agreement
    python tools/score.py outputs/agreement --score_model openai/clip-vit-base-patch32 --device cpu
"""

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_SCORE_MODEL = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14, as torchmetrics' CLIPScore
PNG_SETTINGS_KEY = "text2face"  # the PNG text entry in which generate.py stores an image's settings as JSON
NO_LORA = "none"  # generate.py's --lora value (and lora axis value) of the base model alone
PLACEHOLDER = re.compile(r"\{(\w+)\}")  # {age} in a prompt, filled from the --grid axis of that name
SCORE_BATCH_SIZE = 32  # images, or texts, per CLIP forward pass
SCORES_STEM = "scores"  # scores.csv, .json and .png (scores-2.* etc. for another --score_model)
# Sampling settings (as PNGs store them) that get a scores.csv column, and split the summary, when they vary
SCORED_SETTINGS = ("guidance_scale", "steps", "sampler")
SCORE_COLUMNS = ("file", "prompt", "seed", "lora", "lora_scale", *SCORED_SETTINGS, "clip_score")  # and AXIS_predicted
FONT_SIZE = 11  # of the heat maps' labels and title, in PIL's default font


class ScoreRunError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (python tools/score.py --help lists the flags)\n")


def parse_args(argv=None):
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__[__doc__.index("    python") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "folder",
        type=Path,
        metavar="FOLDER",
        help="the --output_dir of a generate.py run: its images are scored, the scores.* files written in it",
    )
    parser.add_argument(
        "--score_model",
        default=DEFAULT_SCORE_MODEL,
        help=f"Hub id or folder of the transformers CLIP model that judges, in fp32 (default: {DEFAULT_SCORE_MODEL})",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (the default: cuda, else mps, else cpu), cpu, cuda[:N] or mps"
    )
    return parser.parse_args(argv)


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


# Copied from generate.check_writable with GenerateError->ScoreRunError
def check_writable(folder: Path, flag: str):
    """Fail now, before any model is loaded, if `folder` cannot be created or written to; create nothing. A file is
    created and removed in the deepest folder that exists: permission bits say nothing for root or a read-only
    mount."""
    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise ScoreRunError(f"cannot write to {folder}: {existing} is a file, not a folder; pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ScoreRunError(
            f"cannot write to {folder}: {existing} is not writable ({first_line(error)}); pass another {flag}"
        ) from None


# Copied from generate.check_hub_reachable with GenerateError->ScoreRunError
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
        raise ScoreRunError(f"cannot load {needed}, with HF_HUB_OFFLINE=1: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except httpx.ConnectError as error:
        reason = re.sub(r"^\[Errno -?\d+\] ", "", first_line(error))
        raise ScoreRunError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({reason}) to fetch {needed}: {fix}"
        ) from None
    except RepositoryNotFoundError:
        raise ScoreRunError(
            f"no repository {repo_id} on {constants.ENDPOINT}: check the name (a private one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ScoreRunError(f"{repo_id} has no revision {revision}: check --revision") from None
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


def quiet_library_logs():
    """Keep out of the log what a user cannot act on: transformers' warnings (torchvision missing) unless
    TRANSFORMERS_VERBOSITY asks for them, and, when stderr is no terminal, its loading bars."""
    from transformers.utils import logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        logging.set_verbosity_error()
    if not sys.stderr.isatty():
        logging.disable_progress_bar()


def scoring_device(name: str) -> torch.device:
    """The --device: auto is cuda, else mps, else the CPU; any other must exist on this machine."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ScoreRunError(f"--device {name}: {first_line(error)}: use auto, cpu, cuda, cuda:N or mps") from None
    return device


# The images and what they were asked for, from the settings their PNGs carry


def read_folder(folder: Path) -> dict:
    """{path: settings} of the images of FOLDER that generate.py wrote (grid figures and other PNGs are left out);
    fail now, before the CLIP model is loaded, if there are none or the scores cannot be written beside them."""
    if not folder.is_dir():
        raise ScoreRunError(f"{folder}: no such folder: pass the --output_dir of a generate.py run")
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
        raise ScoreRunError(
            f"{folder}: none of its {len(pngs)} PNG file(s) is an image written by generate.py (with "
            f"{PNG_SETTINGS_KEY} settings): pass the --output_dir of a generate.py run"
        )
    # scores.csv has a column per placeholder beside its own: one named like those would overwrite it
    for name in axis_values(images):
        if name in SCORE_COLUMNS or name.endswith("_predicted"):
            raise ScoreRunError(
                f"the placeholder {{{name}}} of the images in {folder} has the name of a scores.csv column: rename "
                f"the placeholder, e.g. {{{name}_value}}, and sample again"
            )
    return images


def axis_values(images: dict) -> dict:
    """{axis: its values in the order given} over every image's placeholder axes."""
    values = {}
    for settings in images.values():
        for axis, texts in settings.get("placeholder_values", {}).items():
            values.setdefault(axis, {}).update(dict.fromkeys(texts))
    return {axis: list(texts) for axis, texts in values.items()}


# CLIP: the model, the embeddings, a row of scores per image


def load_scorer(name: str, device: torch.device) -> tuple:
    """(model, processor): the --score_model CLIP model, on `device`, in fp32 on every device so that scores compare
    between machines, from its folder, the Hugging Face cache or the Hub."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(name).expanduser() if names_a_folder(name) else None
    if folder is not None and not (folder / "config.json").is_file():
        problem = f"no config.json in {folder}" if folder.is_dir() else f"no such folder: {folder}"
        raise ScoreRunError(
            f"--score_model: {problem}: pass the folder of a transformers CLIP model or a Hub id like "
            f"{DEFAULT_SCORE_MODEL}"
        )

    for local_files_only in (True, False):  # the cache first; the Hub only for an id that is not cached
        try:
            model, loading = CLIPModel.from_pretrained(
                folder or name, dtype=torch.float32, local_files_only=local_files_only, output_loading_info=True
            )
            processor = CLIPProcessor.from_pretrained(folder or name, local_files_only=local_files_only)
            break
        except (OSError, ValueError) as error:
            if folder is not None or not local_files_only or not isinstance(error, OSError):
                raise ScoreRunError(
                    f"cannot load --score_model {name} as a CLIP model ({first_line(error)}): pass a transformers "
                    f"CLIP checkpoint such as {DEFAULT_SCORE_MODEL}"
                ) from None
            check_hub_reachable(
                name,
                "config.json",
                f"--score_model {name}, which is not in the Hugging Face cache",
                f"run `{shlex.join(['python', 'download.py', '--score_model', name])}` on a machine with network, "
                "or pass --score_model /path/to/clip-folder",
            )
    # transformers fills weights a checkpoint lacks with random ones, and says so only in the log quieted above
    missing = sorted(loading["missing_keys"])
    if model.config.model_type != "clip" or missing:
        what = f"a {model.config.model_type} model" if model.config.model_type != "clip" else "incomplete"
        raise ScoreRunError(
            f"--score_model {name} is {what}, not a CLIP model with image and text towers"
            f"{f' ({len(missing)} weights missing, {missing[0]} first)' if missing else ''}: pass a transformers "
            f"CLIP checkpoint such as {DEFAULT_SCORE_MODEL}"
        )
    return model.eval().to(device), processor


def clip_embeddings(model, processor, paths: list, texts: list, device) -> tuple:
    """(image_features, text_features): the CLIP embeddings of the images at `paths` and of `texts`, each of length
    1, so that a dot product is a cosine; each text cut to the model's context, SCORE_BATCH_SIZE per forward pass."""
    limit = model.config.text_config.max_position_embeddings
    image_batches, text_batches = [], []
    with torch.inference_mode():
        for start in range(0, len(paths), SCORE_BATCH_SIZE):
            batch = []
            for path in paths[start : start + SCORE_BATCH_SIZE]:
                with Image.open(path) as image:
                    batch.append(image.convert("RGB"))
            pixels = processor(images=batch, return_tensors="pt").pixel_values.to(device)
            image_batches.append(model.get_image_features(pixel_values=pixels).pooler_output)
        for start in range(0, len(texts), SCORE_BATCH_SIZE):
            batch = texts[start : start + SCORE_BATCH_SIZE]
            tokens = processor.tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            text_batches.append(model.get_text_features(**tokens.to(device)).pooler_output)
    features = (torch.cat(batches).float() for batches in (image_batches, text_batches))
    return tuple(torch.nn.functional.normalize(feature, dim=-1).cpu() for feature in features)


# Copied from generate.fill_placeholders
def fill_placeholders(text: str, texts: dict) -> str:
    """`text` with each {name} in `texts` replaced by its value; other {names} stay."""
    return PLACEHOLDER.sub(lambda match: texts.get(match.group(1), match.group(0)), text)


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


def lora_columns(settings) -> dict:
    """The LoRAs of an image as the scores.csv columns lora and lora_scale; none for the base model alone."""
    # PNGs from before several LoRAs held the one LoRA in flat lora_* entries
    flat = [{"lora": settings["lora"], "scale": settings["lora_scale"]}] if settings.get("lora") else []
    loras = settings.get("loras", flat)
    return {
        "lora": " + ".join(entry["lora"] for entry in loras) or NO_LORA,
        "lora_scale": " + ".join(f"{entry['scale']:g}" for entry in loras),
    }


def score_images(model, processor, images: dict, varying: list, device) -> list:
    """A row per image: file, prompt, seed, LoRAs, its `varying` settings, its placeholder values, its CLIP score
    and, for each placeholder axis, CLIP's zero-shot choice among the axis's values (the most similar prompt)."""
    candidates = [agreement_candidates(settings) for settings in images.values()]
    prompts = list(dict.fromkeys(settings["prompt"] for settings in images.values()))
    limit = model.config.text_config.max_position_embeddings
    if cut := sum(len(ids) > limit for ids in processor.tokenizer(prompts).input_ids):
        print(
            f"note: {cut} prompt(s) are longer than the {limit} tokens --score_model reads: their CLIP scores and "
            "agreement see only the start",
            file=sys.stderr,
        )
    candidate_texts = [text for options in candidates for by_value in options.values() for text in by_value.values()]
    texts = list(dict.fromkeys(prompts + candidate_texts))  # each text embedded once
    pictures, text_features = clip_embeddings(model, processor, list(images), texts, device)
    embedded = dict(zip(texts, text_features, strict=True))
    rows = []
    for (path, settings), picture, options in zip(images.items(), pictures, candidates, strict=True):
        row = {
            "file": path.name,
            "prompt": settings["prompt"],
            "seed": settings["seed"],
            **lora_columns(settings),
            **{key: settings.get(key) for key in varying},
            **settings.get("placeholders", {}),
            "clip_score": 100 * max(float(picture @ embedded[settings["prompt"]]), 0.0),
        }
        for axis, prompts_by_value in options.items():
            similarity = torch.stack([embedded[text] for text in prompts_by_value.values()]) @ picture
            row[f"{axis}_predicted"] = list(prompts_by_value)[int(similarity.argmax())]
        rows.append(row)
    return rows


# The summary: per group, the mean CLIP score and the agreement of each axis, as a table, JSON and heat maps


def score_notes(images: dict, values: dict) -> list:
    """Why an axis gets no agreement: a single value, or a placeholder only the negative prompt holds."""
    notes = []
    for axis, texts in values.items():
        if len(texts) == 1:
            notes.append(
                f"{axis} has one value ({texts[0]}): nothing for CLIP to choose between, so no agreement; "
                f"give --grid {axis}=V1,V2,..."
            )
        elif not any(f"{{{axis}}}" in settings.get("template", "") for settings in images.values()):
            notes.append(f"{axis} is not in the prompt (only the negative prompt): no agreement measured")
    return notes


def agreement(judged: list, axis: str, texts: list) -> dict:
    """The agreement of the `judged` rows on `axis`: its rate, over all of them and per value asked, and the confusion
    table {asked: {predicted: count}}."""
    confusion = {asked: dict.fromkeys(texts, 0) for asked in texts}
    for row in judged:
        confusion[row[axis]][row[f"{axis}_predicted"]] += 1
    return {
        "rate": sum(row[axis] == row[f"{axis}_predicted"] for row in judged) / len(judged),
        "images": len(judged),
        "values": {
            asked: counts[asked] / sum(counts.values()) for asked, counts in confusion.items() if any(counts.values())
        },
        "confusion": confusion,
    }


def summarize_scores(rows: list, values: dict, varying: list) -> dict:
    """Per group, that is per LoRA setting (none, or each LoRA with its scale; in the order met) and value of each
    `varying` setting (sorted): its settings, image count, mean CLIP score and, per measured axis, its agreement."""
    groups = {}
    for row in rows:
        lora = row["lora"] if row["lora"] == NO_LORA else f"{row['lora']} (scale {row['lora_scale']})"
        groups.setdefault((lora, *(row[key] for key in varying)), []).append(row)
    lora_order = list(dict.fromkeys(key[0] for key in groups))
    summary = {}
    for key in sorted(groups, key=lambda key: (lora_order.index(key[0]), *key[1:])):
        members = groups[key]
        judged = {axis: [row for row in members if f"{axis}_predicted" in row] for axis in values}
        name = ", ".join([key[0], *(f"{setting}={value}" for setting, value in zip(varying, key[1:], strict=True))])
        summary[name] = {
            **{column: members[0][column] for column in ["lora", "lora_scale", *varying]},
            "images": len(members),
            "clip_score": sum(row["clip_score"] for row in members) / len(members),
            "agreement": {axis: agreement(judged[axis], axis, values[axis]) for axis in values if judged[axis]},
        }
    return summary


def confusion_panel(confusion: dict, rate: float, font, cell: int = 40) -> Image.Image:
    """A confusion table as a heat map: asked values down, predicted across, each square shaded by the share of its
    row and labelled with its count; the diagonal (agreement) framed, the agreement `rate` above. The columns are as
    wide as the longest value, so that values sharing a start (East Asian, South Asian) read whole."""
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
        draw.text((left + (column + 0.5) * column_width, line_height), value, fill="black", font=font, anchor="ma")
    for row, (asked, counts) in enumerate(confusion.items()):
        total = max(sum(counts.values()), 1)
        y = top + row * cell
        draw.text((margin, y + cell / 2), asked, fill="black", font=font, anchor="lm")
        for column, count in enumerate(counts.values()):
            share = count / total
            x = left + column * column_width
            shade = (round(255 - 225 * share), round(255 - 155 * share), 255)  # white to deep blue
            draw.rectangle(
                [x, y, x + column_width - 1, y + cell - 1], fill=shade, outline="black" if row == column else "gray"
            )
            colour = "white" if share > 0.5 else "black"
            draw.text((x + column_width / 2, y + cell / 2), str(count), fill=colour, font=font, anchor="mm")
    return panel


def group_label(name: str, group: dict) -> str:
    """A group's name above its heat maps: the base model's as such, each LoRA by its last two path parts."""
    loras = " + ".join("/".join(Path(lora).parts[-2:]) for lora in group["lora"].split(" + "))
    return ("base model" if group["lora"] == NO_LORA else loras) + name.removeprefix(group["lora"])


def scores_figure(summary: dict, axes: list, scorer_name: str) -> Image.Image | None:
    """The confusion heat maps, a row per measured axis and a column per summary group (the base model beside the
    LoRAs, each varying setting's values side by side), under a title and their labels; None when no axis was
    measured. A group without images of an axis leaves its square blank; the figure is as wide as its labels need."""
    if not axes:
        return None
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height, margin = math.ceil(font.size * 1.25), 8
    panels = {
        (axes.index(axis), column): confusion_panel(
            group["agreement"][axis]["confusion"], group["agreement"][axis]["rate"], font
        )
        for axis in axes
        for column, group in enumerate(summary.values())
        if axis in group["agreement"]
    }
    labels = [group_label(name, group) for name, group in summary.items()]
    width = max(
        [panel.width for panel in panels.values()] + [math.ceil(font.getlength(label)) + margin for label in labels]
    )
    height = max(panel.height for panel in panels.values())
    left = math.ceil(max(font.getlength(axis) for axis in axes)) + 2 * margin
    title = [f"Attribute agreement, CLIP {scorer_name}", "rows: the value asked; columns: the value CLIP picks"]
    top = margin + (len(title) + 1) * line_height + margin
    figure_width = max(left + len(labels) * width, math.ceil(max(font.getlength(line) for line in title)) + 2 * margin)
    figure = Image.new("RGB", (figure_width, top + len(axes) * height), "white")
    draw = ImageDraw.Draw(figure)
    for number, line in enumerate(title):
        draw.text((margin, margin + number * line_height), line, fill="black", font=font)
    for column, label in enumerate(labels):
        draw.text((left + (column + 0.5) * width, top - margin), label, fill="black", font=font, anchor="md")
    for row, axis in enumerate(axes):
        draw.text((margin, top + (row + 0.5) * height), axis, fill="black", font=font, anchor="lm")
    for (row, column), panel in panels.items():
        figure.paste(panel, (left + column * width, top + row * height))
    return figure


def scores_stem(output_dir: Path, scorer_name: str) -> str:
    """The stem of the scores-N.* that the same --score_model wrote, since the folder's images scored again by the
    same judge supersede them; else the first stem free of scores files, said if not the first."""
    taken = []
    for stem in (SCORES_STEM if number == 1 else f"{SCORES_STEM}-{number}" for number in itertools.count(1)):
        if not any((output_dir / f"{stem}{suffix}").exists() for suffix in (".csv", ".json", ".png")):
            break
        try:
            if json.loads((output_dir / f"{stem}.json").read_text(encoding="utf-8"))["score_model"] == scorer_name:
                return stem
        except (OSError, ValueError, KeyError, TypeError):
            pass  # half of an older layout, or not ours: leave it be
        taken.append(stem)
    if taken:
        print(
            f"note: {', '.join(f'{stem}.*' for stem in taken)} in {output_dir} hold the scores of another "
            f"--score_model: these go to {stem}.*",
            file=sys.stderr,
        )
    return stem


def write_scores(rows: list, record: dict, figure, output_dir: Path) -> list:
    """scores.csv (the `rows`), scores.json (the `record`) and scores.png (if `figure`) in `output_dir`, each written
    whole, over the files of an earlier scoring by the same model, beside those of another (scores_stem). Return the
    paths."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    predicted = [key for key in columns if key.endswith("_predicted")]
    columns = [key for key in columns if key not in predicted and key != "clip_score"] + ["clip_score", *predicted]
    table, picture = io.StringIO(), io.BytesIO()
    writer = csv.DictWriter(table, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    if figure is not None:
        figure.save(picture, format="PNG")
    contents = [table.getvalue().encode(), (json.dumps(record, indent=2) + "\n").encode(), picture.getvalue()]
    stem = scores_stem(output_dir, record["score_model"])
    written = []
    for suffix, content in zip([".csv", ".json", ".png"], contents, strict=True):
        path = output_dir / f"{stem}{suffix}"
        if not content:  # no figure: the earlier scoring's goes, if it had a table to draw
            path.unlink(missing_ok=True)
            continue
        try:
            with atomic_write(path) as staging:
                staging.write_bytes(content)
        except OSError as error:
            raise ScoreRunError(f"cannot write {path} ({first_line(error)}): free space or make it writable") from None
        written.append(path)
    return written


def score_table(summary: dict, chance: dict, varying: list) -> str:
    """The summary as text: a line per group (LoRA setting and `varying` settings) with its image count, CLIP score
    and agreement per measured axis, the `chance` rate of each in its header."""
    lines = [[", ".join(["LoRA", *varying]), "images", "CLIP score"]]
    lines[0] += [f"{axis} agreement (chance {rate:.0%})" for axis, rate in chance.items()]
    for group, scores in summary.items():
        rates = [f"{scores['agreement'][axis]['rate']:.0%}" if axis in scores["agreement"] else "-" for axis in chance]
        lines.append([group, str(scores["images"]), f"{scores['clip_score']:.2f}", *rates])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join("  ".join(map(str.ljust, line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        args = parse_args(argv)
        quiet_library_logs()
        device = scoring_device(args.device)
        images = read_folder(args.folder)
        model, processor = load_scorer(args.score_model, device)
        start = time.perf_counter()
        # A sampling setting that varies (a --grid guidance_scale=... sweep) gets a column and splits the groups, so
        # that a sweep of it is not pooled into one number
        varying = [key for key in SCORED_SETTINGS if len({settings.get(key) for settings in images.values()}) > 1]
        rows = score_images(model, processor, images, varying, device)
        values = axis_values(images)
        notes = score_notes(images, values)
        summary = summarize_scores(rows, values, varying)
        measured = [axis for axis in values if any(axis in group["agreement"] for group in summary.values())]
        # What picking a value at random agrees: with a few images per value, a rate near it says little.
        chance = {axis: 1 / len(values[axis]) for axis in measured}
        record = {"score_model": args.score_model, "images": len(rows), "chance": chance, "groups": summary}
        record["notes"] = notes
        figure = scores_figure(summary, measured, args.score_model)
        paths = write_scores(rows, record, figure, args.folder)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"scored {len(rows)} image(s) with {args.score_model} in {time.perf_counter() - start:.1f} s:")
        print(score_table(summary, chance, varying))
        print(f"wrote {', '.join(str(path) for path in paths)}")
        return 0
    except ScoreRunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no scores written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
