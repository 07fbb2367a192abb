"""tools/export_kohya.py, the one kohya converter: real LoRA files of the tiny SD2.1-shaped pipeline exported, loaded
back by diffusers and by generate.py, their pixels compared with the original LoRA's."""

import hashlib
import importlib.util
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_generate import PROMPT, pixels, run, write_published_layout_lora
from test_interop import KOHYA_KEY, MODULES, non_lora_file, old_diffusers_lora, sample, write_alpha_lora

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "export_kohya.py"
spec = importlib.util.spec_from_file_location("export_kohya", SCRIPT)
export_kohya = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_kohya)


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    """{"published": the published key layout, no alphas; "alpha": alpha 8 on rank 4 in the header}."""
    folder = tmp_path_factory.mktemp("loras")
    return {
        "published": write_published_layout_lora(tiny_model, folder / "published.safetensors"),
        "alpha": write_alpha_lora(tiny_model, folder / "alpha-run"),
    }


@pytest.fixture(scope="module")
def kohya_files(loras, tmp_path_factory):
    """Each LoRA exported by tools/export_kohya.py, with a --base_model that does not exist: export never loads
    it."""
    folder = tmp_path_factory.mktemp("kohya")
    files = {}
    for name, source in loras.items():
        files[name] = folder / f"{name}.safetensors"
        flags = [files[name], "--lora", source, "--base_model", folder / "no-model"]
        assert export_kohya.main(flags) == 0
    return files


@pytest.mark.parametrize("name", ["published", "alpha"])
def test_kohya_export_loaded_by_diffusers_gives_the_same_image(tiny_model, loras, kohya_files, name):
    kohya = load_file(kohya_files[name])
    assert all(KOHYA_KEY.match(key) for key in kohya), [key for key in kohya if not KOHYA_KEY.match(key)]
    modules = {key.split(".")[0] for key in kohya}
    assert len(modules) == sum(MODULES.values()) and len(kohya) == 3 * len(modules)  # down, up and alpha of each
    assert sum(module.startswith("lora_te_text_model_encoder_layers_") for module in modules) == MODULES["text_encoder"]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj" in modules
    alpha = {"published": 4.0, "alpha": 8.0}[name]  # rank 4 without alphas; the header's lora_alpha otherwise
    assert {kohya[f"{module}.alpha"].item() for module in modules} == {alpha}
    with safe_open(kohya_files[name], framework="pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == alpha
    source = loras[name] if loras[name].is_file() else loras[name] / "pytorch_lora_weights.safetensors"
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata.get("ss_steps") == {"published": None, "alpha": "1234"}[name]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    base = sample(pipe)
    pipe.load_lora_weights(str(loras[name]), adapter_name="original")
    original = sample(pipe)
    pipe.load_lora_weights(str(kohya_files[name]), adapter_name="kohya")
    pipe.set_adapters("kohya")
    exported = sample(pipe)
    assert np.abs(original - base).mean() > 5 and original.std() > 10
    assert np.abs(exported - original).mean() <= 1.0  # 1/255 per pixel on average


def test_kohya_file_exports_as_it_is_with_missing_alphas_added(kohya_files, tmp_path):
    exported = load_file(kohya_files["published"])
    without_alphas = tmp_path / "no-alphas.safetensors"
    save_file({key: value for key, value in exported.items() if not key.endswith(".alpha")}, without_alphas)
    again = tmp_path / "again.safetensors"
    assert export_kohya.main([again, "--lora", without_alphas]) == 0
    result = load_file(again)
    assert result.keys() == exported.keys()
    assert all(torch.equal(result[key], exported[key].to(result[key].dtype)) for key in exported)


def test_generate_takes_a_kohya_lora_into_both_components(tiny_model, loras, kohya_files, tmp_path):
    code, (kohya_image,) = run(tiny_model, tmp_path / "kohya", "--prompt", PROMPT, "--lora", kohya_files["alpha"])
    assert code == 0
    _, (original_image,) = run(tiny_model, tmp_path / "original", "--prompt", PROMPT, "--lora", loras["alpha"])
    _, (base_image,) = run(tiny_model, tmp_path / "base", "--prompt", PROMPT, "--lora", "none")
    assert np.abs(pixels(kohya_image) - pixels(original_image)).mean() <= 1.0
    assert np.abs(pixels(kohya_image) - pixels(base_image)).mean() > 5

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(kohya_files["alpha"]), adapter_name="lora0")
    for component, count in MODULES.items():
        layers = [module for module in getattr(pipe, component).modules() if isinstance(module, BaseTunerLayer)]
        assert sum("lora0" in module.active_adapters for module in layers) == count


def existing_file(tmp_path):
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"keep me")
    return path


BAD_INPUTS = {
    "export of the base model": (
        lambda tmp, lora: [tmp / "out.safetensors", "--lora", "none"],
        "give a --lora other than none",
    ),
    "export over an existing file": (lambda tmp, lora: [existing_file(tmp), "--lora", lora], "already exists"),
    "export of a non-LoRA file": (
        lambda tmp, lora: [tmp / "out.safetensors", "--lora", non_lora_file(tmp)],
        "none of the 1 keys",
    ),
    "export of an unconvertible layout": (
        lambda tmp, lora: [tmp / "out.safetensors", "--lora", old_diffusers_lora(tmp)],
        "cannot convert",
    ),
    "export of two LoRAs": (
        lambda tmp, lora: [tmp / "out.safetensors", "--lora", lora, "--lora", lora],
        "one LoRA at a time",
    ),
    "export of a LoRA that is not there": (
        lambda tmp, lora: [tmp / "out.safetensors", "--lora", tmp / "missing.safetensors"],
        "missing.safetensors does not exist",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_nonzero_exit(loras, tmp_path, capsys, case):
    make_flags, message = BAD_INPUTS[case]
    before = sorted(tmp_path.rglob("*"))
    flags = make_flags(tmp_path, str(loras["published"]))
    made = sorted(tmp_path.rglob("*"))
    try:
        code = export_kohya.main(flags)
    except SystemExit as exit:  # a bad command line: argparse's exit status 2
        code = exit.code
    assert code != 0 and before == [] and sorted(tmp_path.rglob("*")) == made  # nothing written
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    if case == "export over an existing file":
        assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"


def test_export_error_from_the_command_line_has_no_traceback(scripts, tmp_path):
    path = non_lora_file(tmp_path)
    result = scripts.run(SCRIPT, ["out.safetensors", "--lora", path], cwd=tmp_path, libraries=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: none of the 1 keys")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_the_help_ends_with_the_docstring_examples(scripts):
    result = scripts.run(SCRIPT, ["--help"], libraries=True)
    assert result.returncode == 0, result.stderr
    help_text = result.stdout
    assert help_text.rstrip().endswith(export_kohya.__doc__[export_kohya.__doc__.index("    python") :].rstrip())


def test_an_unwritable_export_folder_fails_before_the_lora_is_read(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    target = tmp_path / "notes.txt" / "kohya.safetensors"
    assert export_kohya.main([target, "--lora", tmp_path / "missing.safetensors"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot write to {target.parent}: ") and "is a file, not a folder" in line


def test_an_exported_lora_honours_the_umask(loras, tmp_path):
    old_umask = os.umask(0o027)
    try:
        assert export_kohya.main([tmp_path / "kohya.safetensors", "--lora", loras["published"]]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "kohya.safetensors").stat().st_mode) == 0o640
    assert load_file(tmp_path / "kohya.safetensors")  # still a whole safetensors file
