"""tools/score.py (over folders that generate.py sampled) and finetune_lora.py --validation_score against a tiny
random CLIP model saved to disk: the scores checked against transformers computing them directly on the same PNGs
and prompts."""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_generate import run, write_published_layout_lora
from train_helpers import one_thread, train_args  # noqa: F401  (one_thread: autouse fixture)
from transformers import CLIPModel, CLIPProcessor

import finetune_lora
import generate

TEMPLATE = "a {age} year old {ethnicity} woman with long red hair smiles"
AGES = ["20", "40", "60"]
ETHNICITIES = ["Asian", "Black"]
GUIDANCE = ["1", "7.5", "12"]
SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "score.py"
spec = importlib.util.spec_from_file_location("score", SCRIPT)
score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score)


def score_folder(folder, score_model, *flags) -> int:
    """tools/score.py in this process: its exit code."""
    return score.main([folder, "--score_model", score_model, "--device", "cpu", *flags])


@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory):
    return write_published_layout_lora(tiny_model, tmp_path_factory.mktemp("lora") / "published.safetensors")


def scored_sweep(tiny_model, tiny_clip, folder: Path, *flags) -> Path:
    """The folder, sampled by generate.py and then scored by tools/score.py."""
    assert run(tiny_model, folder, *flags)[0] == 0
    assert score_folder(folder, tiny_clip) == 0
    return folder


@pytest.fixture(scope="module")
def attribute_sweep(tiny_model, tiny_clip, tmp_path_factory):
    """A scored age x ethnicity grid of the base model, two images per cell: the folder."""
    flags = ["--prompt", TEMPLATE, "--grid", f"age={','.join(AGES)}", "--grid", f"ethnicity={','.join(ETHNICITIES)}"]
    flags += ["--num_images", "2", "--lora", "none"]
    return scored_sweep(tiny_model, tiny_clip, tmp_path_factory.mktemp("sweep"), *flags)


@pytest.fixture(scope="module")
def compare_sweep(tiny_model, tiny_clip, lora_file, tmp_path_factory):
    """A scored --compare over an age axis (base model beside the LoRA): the folder."""
    prompt = "a {age} year old woman with long red hair smiles"
    flags = ["--compare", "--lora", lora_file, "--prompt", prompt, "--grid", f"age={','.join(AGES)}"]
    return scored_sweep(tiny_model, tiny_clip, tmp_path_factory.mktemp("compare"), *flags)


@pytest.fixture(scope="module")
def guidance_sweep(tiny_model, tiny_clip, tmp_path_factory):
    """A scored guidance_scale x age grid of the base model: the folder."""
    flags = ["--prompt", "a {age} year old woman", "--grid", f"guidance_scale={','.join(GUIDANCE)}"]
    flags += ["--grid", f"age={','.join(AGES)}", "--lora", "none"]
    return scored_sweep(tiny_model, tiny_clip, tmp_path_factory.mktemp("guidance"), *flags)


@pytest.fixture(scope="module")
def not_clip(tiny_model, tiny_clip, tmp_path_factory):
    """Folders that CLIPModel loads, filling what they lack with random weights: {kind: folder}."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("not-clip")
    text_encoder = shutil.copytree(tiny_model / "text_encoder", root / "text-encoder")
    for path in [*(tiny_model / "tokenizer").iterdir(), tiny_clip / "processor_config.json"]:
        shutil.copy(path, text_encoder)  # loads as a processor, so only the weights are wrong
    incomplete = shutil.copytree(tiny_clip, root / "incomplete")
    weights = load_file(incomplete / "model.safetensors")
    del weights["text_projection.weight"]
    save_file(weights, incomplete / "model.safetensors", metadata={"format": "pt"})
    return {"TEXT_ENCODER": text_encoder, "INCOMPLETE": incomplete}


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)


def cosines(clip, png: Path, texts: list) -> torch.Tensor:
    """Cosine similarity of the PNG with each text, from CLIPModel's own forward pass (its logits over its scale)."""
    model, processor = clip
    inputs = processor(text=texts, images=Image.open(png), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
        return output.logits_per_image[0] / model.logit_scale.exp()


def read_rows(folder: Path, name: str = "scores.csv") -> list:
    with open(folder / name, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_clip_scores_and_predictions_equal_a_direct_transformers_computation(attribute_sweep, clip):
    rows = read_rows(attribute_sweep)
    assert len(rows) == len(AGES) * len(ETHNICITIES) * 2
    assert list(rows[0]) == [
        *["file", "prompt", "seed", "lora", "lora_scale", "age", "ethnicity"],
        *["clip_score", "age_predicted", "ethnicity_predicted"],
    ]
    for row in rows:
        png = attribute_sweep / row["file"]
        assert row["prompt"] == TEMPLATE.format(age=row["age"], ethnicity=row["ethnicity"])
        assert json.loads(Image.open(png).text[generate.PNG_SETTINGS_KEY])["prompt"] == row["prompt"]
        expected = 100 * max(float(cosines(clip, png, [row["prompt"]])[0]), 0.0)
        assert float(row["clip_score"]) == pytest.approx(expected, abs=1e-4)
        # The other placeholder keeps the image's value while one axis runs through its values.
        by_age = cosines(clip, png, [TEMPLATE.format(age=age, ethnicity=row["ethnicity"]) for age in AGES])
        by_ethnicity = cosines(clip, png, [TEMPLATE.format(age=row["age"], ethnicity=e) for e in ETHNICITIES])
        assert row["age_predicted"] == AGES[int(by_age.argmax())]
        assert row["ethnicity_predicted"] == ETHNICITIES[int(by_ethnicity.argmax())]
    assert {row["lora"] for row in rows} == {"none"} and {row["seed"] for row in rows} == {"42", "43"}


def recount(rows: list, axis: str) -> dict:
    judged = [row for row in rows if row.get(f"{axis}_predicted")]
    return {
        "rate": sum(row[axis] == row[f"{axis}_predicted"] for row in judged) / len(judged),
        "values": {
            value: sum(row[f"{axis}_predicted"] == value for row in judged if row[axis] == value)
            / sum(row[axis] == value for row in judged)
            for value in dict.fromkeys(row[axis] for row in judged)
        },
    }


@pytest.mark.parametrize("sweep", ["attribute_sweep", "compare_sweep", "guidance_sweep"])
def test_the_summary_recounts_from_the_rows_and_its_tables_sum_to_the_images(request, sweep):
    folder = request.getfixturevalue(sweep)
    rows = read_rows(folder)
    summary = json.loads((folder / "scores.json").read_text())
    assert summary["images"] == len(rows)
    groups = {}
    for row in rows:
        key = row["lora"] if row["lora"] == "none" else f"{row['lora']} (scale {row['lora_scale']})"
        key += "".join(
            f", {setting}={row[setting]}" for setting in ("guidance_scale", "steps", "sampler") if setting in row
        )
        groups.setdefault(key, []).append(row)
    assert list(summary["groups"]) == list(groups)
    axes = ["age", "ethnicity"] if sweep == "attribute_sweep" else ["age"]
    for name, members in groups.items():
        group = summary["groups"][name]
        assert group["images"] == len(members)
        assert group["clip_score"] == pytest.approx(sum(float(row["clip_score"]) for row in members) / len(members))
        assert list(group["agreement"]) == axes
        for axis in axes:
            expected = recount(members, axis)
            assert group["agreement"][axis]["rate"] == pytest.approx(expected["rate"])
            assert group["agreement"][axis]["values"] == pytest.approx(expected["values"])
            confusion = group["agreement"][axis]["confusion"]
            assert sum(sum(counts.values()) for counts in confusion.values()) == len(members)
            for asked, counts in confusion.items():
                for predicted, count in counts.items():
                    assert count == sum(row[axis] == asked and row[f"{axis}_predicted"] == predicted for row in members)
    assert sum(group["images"] for group in summary["groups"].values()) == len(rows)
    assert summary["chance"] == pytest.approx(
        {axis: 1 / len({"age": AGES, "ethnicity": ETHNICITIES}[axis]) for axis in axes}
    )
    figure = Image.open(folder / "scores.png")
    assert figure.width > 100 and figure.height > 100


def test_a_guidance_sweep_gets_a_column_and_a_summary_group_per_guidance_scale(guidance_sweep, capsys):
    rows = read_rows(guidance_sweep)
    assert list(rows[0]) == ["file", "prompt", "seed", "lora", "lora_scale", "guidance_scale", "age"] + [
        "clip_score",
        "age_predicted",
    ]
    assert sorted({float(row["guidance_scale"]) for row in rows}) == [float(value) for value in GUIDANCE]
    groups = json.loads((guidance_sweep / "scores.json").read_text())["groups"]
    assert list(groups) == [f"none, guidance_scale={float(value)}" for value in GUIDANCE]
    for value, group in zip(GUIDANCE, groups.values(), strict=True):
        assert group["guidance_scale"] == float(value) and group["images"] == len(AGES)
        assert sum(group["agreement"]["age"]["confusion"][age][age] for age in AGES) == sum(
            row["age"] == row["age_predicted"] for row in rows if float(row["guidance_scale"]) == float(value)
        )


def test_compare_scores_the_base_model_beside_the_lora(compare_sweep, lora_file):
    summary = json.loads((compare_sweep / "scores.json").read_text())
    assert list(summary["groups"]) == ["none", f"{lora_file} (scale 1)"]
    assert all(group["images"] == len(AGES) for group in summary["groups"].values())
    rows = read_rows(compare_sweep)
    assert sorted((row["lora"], row["age"]) for row in rows) == sorted(
        (lora, age) for lora in ("none", str(lora_file)) for age in AGES
    )
    assert "ethnicity" not in rows[0]
    # The figure: a panel per LoRA setting, side by side, under a title and their labels.
    figure = Image.open(compare_sweep / "scores.png")
    assert figure.width > figure.height


def test_a_copy_of_a_folder_gets_the_scores_of_the_folder(attribute_sweep, tiny_clip, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(attribute_sweep, folder, ignore=shutil.ignore_patterns("scores*"))
    assert score_folder(folder, tiny_clip) == 0
    out = capsys.readouterr().out
    assert "scored 12 image(s)" in out and "age agreement (chance 33%)" in out
    again, before = read_rows(folder), read_rows(attribute_sweep)
    assert [{k: v for k, v in row.items() if k != "clip_score"} for row in again] == [
        {k: v for k, v in row.items() if k != "clip_score"} for row in before
    ]
    assert [float(row["clip_score"]) for row in again] == pytest.approx([float(row["clip_score"]) for row in before])
    (again_group,) = json.loads((folder / "scores.json").read_text())["groups"].values()
    (before_group,) = json.loads((attribute_sweep / "scores.json").read_text())["groups"].values()
    assert again_group.pop("clip_score") == pytest.approx(before_group.pop("clip_score"))
    assert again_group == before_group


def test_scoring_again_replaces_the_scores_of_the_same_model_and_writes_beside_another_models(
    attribute_sweep, tiny_clip, tmp_path, capsys
):
    folder = shutil.copytree(attribute_sweep, tmp_path / "copy")
    before = {path.name: path.read_bytes() for path in folder.glob("scores*")}
    (folder / "scores.csv").write_text("stale\n")
    assert score_folder(folder, tiny_clip) == 0
    assert {path.name: path.read_bytes() for path in folder.glob("scores*")}.keys() == before.keys()
    # The stale file replaced by the same scores (CLIP scores to float precision: the CPU's sums vary in the last bits).
    again, scored = read_rows(folder), read_rows(attribute_sweep)
    clip_scores = [float(row.pop("clip_score")) for row in again]
    assert clip_scores == pytest.approx([float(row.pop("clip_score")) for row in scored])
    assert again == scored
    replaced = (folder / "scores.json").read_bytes()
    other = shutil.copytree(tiny_clip, tmp_path / "other-clip")
    for time in range(2):  # the second time over its own first scores, without a note
        capsys.readouterr()
        assert score_folder(folder, other) == 0
        assert ("note: scores.* in" in capsys.readouterr().err) == (time == 0)
        assert sorted(path.name for path in folder.glob("scores*")) == sorted(
            [*before, "scores-2.csv", "scores-2.json", "scores-2.png"]
        )
    assert json.loads((folder / "scores-2.json").read_text())["score_model"] == str(other)
    assert (folder / "scores.json").read_bytes() == replaced


@pytest.mark.parametrize(
    "flags, note",
    [
        (
            ["--prompt", "a {age} year old man", "--grid", "age=40"],
            "age has one value (40): nothing for CLIP to choose",
        ),
        (
            ["--prompt", "a man", "--negative_prompt", "{mood}", "--grid", "mood=happy,sad"],
            "mood is not in the prompt (only the negative prompt): no agreement measured",
        ),
    ],
)
def test_an_axis_clip_cannot_judge_gets_a_note_and_no_agreement(tiny_model, tiny_clip, tmp_path, capsys, flags, note):
    assert run(tiny_model, tmp_path, *flags, "--lora", "none")[0] == 0
    assert score_folder(tmp_path, tiny_clip) == 0
    assert f"note: {note}" in capsys.readouterr().err
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["groups"]["none"]["agreement"] == {} and note in summary["notes"][0]
    assert not (tmp_path / "scores.png").exists()  # no table to draw
    rows = read_rows(tmp_path)
    assert rows and not any(key.endswith("_predicted") for key in rows[0])


def test_a_prompt_longer_than_the_score_model_reads_is_cut_and_said_once(tiny_model, tiny_clip, tmp_path, capsys):
    long_prompt = "a young woman with long red hair smiles, " * 8  # over 77 tokens of the test tokenizer
    flags = ["--prompt", long_prompt, "--num_images", "2", "--lora", "none"]
    assert run(tiny_model, tmp_path, *flags)[0] == 0
    assert score_folder(tmp_path, tiny_clip) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "tokens --score_model reads" in line]
    assert notes == [
        "note: 1 prompt(s) are longer than the 77 tokens --score_model reads: their CLIP scores and agreement see "
        "only the start"
    ]
    assert len(read_rows(tmp_path)) == 2


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "score_model, message",
    [
        ("./missing-folder/clip", "--score_model: no such folder: missing-folder/clip"),
        ("TINY_MODEL", "--score_model: no config.json in"),
        (
            "someone/clip-not-cached",
            "someone/clip-not-cached, which is not in the Hugging Face cache, with HF_HUB_OFFLINE=1: run "
            "`python download.py --score_model someone/clip-not-cached`",
        ),
        ("TEXT_ENCODER", "text-encoder is a clip_text_model model, not a CLIP model with image and text towers"),
        ("INCOMPLETE", "incomplete is incomplete, not a CLIP model with image and text towers (1 weights missing, "),
    ],
)
def test_a_score_model_that_cannot_load_fails_before_anything_is_scored(
    attribute_sweep, tiny_model, not_clip, tmp_path, capsys, score_model, message
):
    score_model = str({"TINY_MODEL": tiny_model, **not_clip}.get(score_model, score_model))
    folder = shutil.copytree(attribute_sweep, tmp_path / "copy", ignore=shutil.ignore_patterns("scores*"))
    assert score_folder(folder, score_model) == 1
    assert message in one_error_line(capsys)
    assert not list(folder.glob("scores*"))


@pytest.mark.parametrize("contents", ["nothing", "foreign png", "grid figure only"])
def test_a_folder_without_our_images_is_one_line(attribute_sweep, tiny_clip, tmp_path, capsys, contents):
    folder = tmp_path / "folder"
    folder.mkdir()
    if contents == "foreign png":
        Image.new("RGB", (8, 8)).save(folder / "photo.png")
    elif contents == "grid figure only":
        shutil.copy(sorted(attribute_sweep.glob("*-grid-*.png"))[0], folder)
    assert score_folder(folder, tiny_clip) == 1
    assert "is an image written by generate.py" in one_error_line(capsys)


@pytest.mark.parametrize("placeholder", ["prompt", "file", "sampler", "age_predicted"])
def test_a_folder_whose_placeholder_clashes_with_a_score_column_is_one_line(
    tiny_model, tiny_clip, tmp_path, capsys, placeholder
):
    flags = ["--prompt", f"a {{{placeholder}}} face", "--grid", f"{placeholder}=a,b", "--lora", "none"]
    assert run(tiny_model, tmp_path, *flags)[0] == 0
    capsys.readouterr()
    assert score_folder(tmp_path, tiny_clip) == 1
    assert (
        f"the placeholder {{{placeholder}}} of the images in {tmp_path} has the name of a scores.csv column: rename "
        f"the placeholder, e.g. {{{placeholder}_value}}"
    ) in one_error_line(capsys)
    assert not list(tmp_path.glob("scores*"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["no-such-folder"], "no-such-folder: no such folder: pass the --output_dir of a generate.py run"),
        ([".", "--device", "cuda:7"], "--device cuda:7: "),
        ([".", "--device", "tpu"], "--device tpu: "),
    ],
)
def test_misuse_of_the_score_tool_is_one_line(capsys, flags, message):
    assert score.main(flags) == 1
    assert message in one_error_line(capsys)


def test_the_score_tool_runs_as_a_script_and_its_help_ends_with_its_examples(scripts):
    result = scripts.run(SCRIPT, ["--help"], libraries=True)
    assert result.returncode == 0, result.stderr
    help_text = result.stdout.rstrip()
    examples = score.__doc__[score.__doc__.index("    python") :].rstrip()
    assert help_text.endswith(examples)
    bad = scripts.run(SCRIPT, [".", "--no-such-flag"], libraries=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: unrecognized arguments: --no-such-flag")


# ---------------------------------------------------------------------------------------------- finetune_lora.py


def test_validation_score_logs_the_clip_score_of_each_validation_and_writes_it_beside_the_grid(
    tiny_model, tiny_clip, face_folder, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    flags = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "tensorboard"]
    flags += ["--validation_prompts", "a face", "an old man", "--num_validation_images", "2"]
    flags += ["--validation_score", "--score_model", tiny_clip]
    assert finetune_lora.main(train_args(tiny_model, face_folder, output, *flags)) == 0

    logged = {}
    for folder in {path.parent for path in (output / "logs").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder)).Reload()
        if "validation/clip_score" in accumulator.Tags()["scalars"]:
            logged.update({event.step: event.value for event in accumulator.Scalars("validation/clip_score")})
    assert sorted(logged) == [0, 1, 2]  # step 0, each checkpoint; the end of the run reuses step 2's
    for step in (1, 2):
        beside_grid = json.loads((output / f"checkpoint-{step}" / "validation.json").read_text())
        assert (output / f"checkpoint-{step}" / "validation.png").is_file()
        assert beside_grid["clip_score"] == pytest.approx(logged[step], abs=1e-4)
        assert len(beside_grid["clip_score (per prompt)"]) == 2 and beside_grid["score_model"] == str(tiny_clip)
        assert 0 <= beside_grid["clip_score"] <= 100
    assert json.loads((output / "validation" / "step-000000.json").read_text())["clip_score"] == pytest.approx(
        logged[0], abs=1e-4
    )


@pytest.mark.parametrize(
    "score_model, message",
    [
        ("NO_CLIP", "--score_model: no such folder:"),
        ("TINY_MODEL", "has no config.json: pass the folder of a transformers CLIP model"),
        ("someone/clip-not-cached", "score model someone/clip-not-cached, which is not in the Hugging Face cache"),
        ("TEXT_ENCODER", "holds a clip_text_model model with 398 CLIP weights missing, not a whole CLIPModel"),
        ("INCOMPLETE", "holds a clip model with 1 CLIP weights missing, not a whole CLIPModel"),
    ],
)
def test_a_validation_score_model_that_cannot_load_stops_the_run_before_the_data_is_read(
    tiny_model, not_clip, face_folder, tmp_path, capfd, score_model, message
):
    score_model = {"NO_CLIP": tmp_path / "no-clip", "TINY_MODEL": tiny_model, **not_clip}.get(score_model, score_model)
    output = tmp_path / "run"
    flags = ["--validation_prompts", "a face", "--validation_score", "--score_model", score_model]
    assert finetune_lora.main(train_args(tiny_model, face_folder, output, *flags)) == 1
    err = capfd.readouterr().err
    assert message in err
    assert "images found" not in err and not (output / "logs").exists()


def test_a_score_model_without_validation_score_is_refused(tmp_path, capfd):
    flags = ["--score_model", "my/clip"]
    assert finetune_lora.main(train_args(tmp_path, tmp_path, tmp_path / "run", *flags)) == 1
    assert "error: --score_model is the CLIP model of --validation_score" in capfd.readouterr().err


def test_validation_score_without_validation_prompts_is_refused(tmp_path, capfd):
    assert finetune_lora.main(train_args(tmp_path, tmp_path, tmp_path / "run", "--validation_score")) == 1
    assert "error: --validation_score scores the validation images: give --validation_prompts" in capfd.readouterr().err
