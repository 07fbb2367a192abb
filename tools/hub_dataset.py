"""Write a dataset of images and captions (from the Hub, or a local dataset folder) as the image folder that
finetune_lora.py trains on: each image that has a caption, as its file was stored, and metadata.jsonl beside them
({"file_name", "text"}, the text a list when a row has several captions). Rows without a caption are left out; an
existing FOLDER is never written into.

    python tools/hub_dataset.py lambdalabs/naruto-blip-captions data/naruto
    python tools/hub_dataset.py my/faces data/faces --image_column photo --caption_column captions
    accelerate launch finetune_lora.py --train_data_dir data/faces --output_dir outputs/faces
"""

import argparse
import io
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

# The suffixes finetune_lora.py reads (its IMAGE_EXTENSIONS; tests/test_hub_dataset.py checks that they agree).
TRAINABLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class DatasetError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (python tools/hub_dataset.py --help lists the flags)\n")


# Copied from generate.first_line
def first_line(error: BaseException) -> str:
    """An exception as one line of an error message: its first line, or its type when its text is empty."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_args(argv=None):
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__[__doc__.index("    python") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help="A Hub dataset id, or a local dataset folder, for datasets.load_dataset.")
    parser.add_argument("folder", type=Path, help="The image folder to write; it must not exist yet.")
    parser.add_argument("--config", help="Configuration of the dataset (default: its only one).")
    parser.add_argument("--data_dir", help="load_dataset's data_dir (default: none).")
    parser.add_argument("--split", default="train", help="Split to write (default: train).")
    parser.add_argument("--image_column", default="image", help="Column of the image (default: image).")
    parser.add_argument(
        "--caption_column", default="text", help="Column of the caption, a string or list of strings (default: text)."
    )
    parser.add_argument("--cache_dir", help="Cache of downloaded datasets (default: $HF_HOME's).")
    return parser.parse_args(argv)


def captions_of(value) -> list:
    """A row's captions: a string or a list of strings, the empty ones left out."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"captions must be strings or lists of strings, found {type(value).__name__}")
    return [v for v in value if v.strip()]


def write_folder(args) -> tuple:
    """Write the image folder, whole or not at all; return the number of images written and of rows left out."""
    import datasets

    if args.folder.exists():
        raise DatasetError(f"{args.folder} exists: pass a new folder")
    try:
        dataset = datasets.load_dataset(args.dataset, args.config, data_dir=args.data_dir, cache_dir=args.cache_dir)
        dataset = dataset[args.split]
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as error:
        raise DatasetError(f"cannot load dataset {args.dataset}: {first_line(error)}") from error
    for column, flag in ((args.image_column, "--image_column"), (args.caption_column, "--caption_column")):
        if column not in dataset.column_names:
            raise DatasetError(
                f"dataset {args.dataset} has no column '{column}' (columns: {', '.join(dataset.column_names)}); "
                f"pass {flag}"
            )
    if isinstance(dataset.features[args.image_column], datasets.Image):  # the files as stored, not decoded again
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    try:
        args.folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{args.folder.name}.", dir=args.folder.parent))
    except OSError as error:
        raise DatasetError(f"cannot write into {args.folder.parent}: {first_line(error)}") from error
    try:
        records = [record for index, row in enumerate(dataset) if (record := write_row(args, staging, index, row))]
        if not records:
            raise DatasetError(f"no row of {args.dataset} has an image and a caption in column '{args.caption_column}'")
        (staging / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        staging.rename(args.folder)
    except OSError as error:
        raise DatasetError(f"cannot write {args.folder}: {first_line(error)}; nothing was written") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(records), len(dataset) - len(records)


def write_row(args, staging: Path, index: int, row: dict):
    """Write one row's image into `staging` and return its metadata record, or None for a row without an image or
    caption. A file finetune_lora.py cannot read by its suffix is written again as PNG."""
    from PIL import Image, UnidentifiedImageError

    captions = captions_of(row[args.caption_column]) if row[args.caption_column] is not None else []
    image = row[args.image_column]
    if not captions or not image:
        return None
    path = image if isinstance(image, str) else image.get("path")
    try:
        data = Path(path).read_bytes() if isinstance(image, str) or image.get("bytes") is None else image["bytes"]
    except OSError as error:
        raise DatasetError(f"row {index}: cannot read its image {path}: {first_line(error)}") from error
    suffix = Path(path).suffix.lower() if path else ""
    if suffix not in TRAINABLE_SUFFIXES:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                suffix, buffer = ".png", io.BytesIO()
                opened.save(buffer, format="PNG")
                data = buffer.getvalue()
        except (UnidentifiedImageError, OSError) as error:
            stored = Path(path).name if path else "its image"
            raise DatasetError(f"row {index}: {stored} cannot be read as an image; fix or remove that row") from error
    name = f"{index:06d}{suffix}"
    (staging / name).write_bytes(data)
    return {"file_name": name, "text": captions if len(captions) > 1 else captions[0]}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        count, left_out = write_folder(args)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {count} images and their captions to {args.folder}", file=sys.stderr, end="")
    print(f" ({left_out} rows without an image or a caption left out)" if left_out else "", file=sys.stderr)
    print(f"Next: accelerate launch finetune_lora.py --train_data_dir {shlex.quote(str(args.folder))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
