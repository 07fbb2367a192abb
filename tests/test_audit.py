"""tools/audit.py over a folder that generate.py sampled (two templates, base model beside a LoRA), against a tiny
random CLIP and a tiny random DINOv2 saved to disk: the audit's choices checked against transformers computing them
directly, the nearest training images against a brute-force search over directly computed embeddings."""

import csv
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from test_generate import run, write_published_layout_lora
from train_helpers import one_thread  # noqa: F401  (one_thread: autouse fixture)
from transformers import AutoModel, BitImageProcessor, CLIPModel, CLIPProcessor, Dinov2Config, Dinov2Model

import generate

TEMPLATES = ["a portrait of a {job}", "a photo of a {job} at work"]
JOBS = ["doctor", "nurse"]
SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "audit.py"
spec = importlib.util.spec_from_file_location("audit", SCRIPT)
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)


@pytest.fixture(scope="module")
def _sampled(tiny_model, tmp_path_factory):
    """Both templates over the job axis, base model beside a LoRA, one image each: eight PNGs."""
    lora = write_published_layout_lora(tiny_model, tmp_path_factory.mktemp("lora") / "lora.safetensors")
    folder = tmp_path_factory.mktemp("sampled") / "faces"
    flags = ["--compare", "--lora", lora, "--grid", f"job={','.join(JOBS)}", "--no_figure"]
    assert run(tiny_model, folder, *flags, *(flag for template in TEMPLATES for flag in ("--prompt", template)))[0] == 0
    return folder


@pytest.fixture
def sampled(_sampled, tmp_path):
    """A fresh copy of the sampled folder, which a test may write into."""
    return shutil.copytree(_sampled, tmp_path / "sampled")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """Path of a random-weight Dinov2Model (32x32 images in 8x8 patches) with its image processor."""
    path = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    config.intermediate_size = 37
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def read_rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def audit_folder(folder, *flags) -> int:
    return audit.main([folder, "--device", "cpu", *flags])


def test_help_ends_with_the_examples(capsys):
    with pytest.raises(SystemExit):
        audit.parse_args(["--help"])
    assert capsys.readouterr().out.rstrip().endswith(audit.__doc__.rstrip().splitlines()[-1].strip())


def test_audit_counts_equal_a_direct_transformers_computation(sampled, tiny_clip):
    flags = ["--score_model", tiny_clip, "--audit", "gender=man,woman", "--audit", "age=child,young adult,elderly"]
    assert audit_folder(sampled, *flags, "--audit_template", "a close-up photo of a {value}") == 0
    rows, record = read_rows(sampled / "audit.csv"), json.loads((sampled / "audit.json").read_text())
    texts = {"gender": {v: f"a close-up photo of a {v}" for v in ["man", "woman"]}}
    texts["age"] = {v: f"a close-up photo of a {v}" for v in ["child", "young adult", "elderly"]}
    assert record["texts"] == texts
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    for row in rows:
        png = sampled / row["file"]
        settings = json.loads(Image.open(png).text[generate.PNG_SETTINGS_KEY])
        assert row["template"] == settings["template"] and row["prompt"] == settings["prompt"]
        for attribute, by_value in texts.items():
            inputs = processor(text=list(by_value.values()), images=Image.open(png), return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = model(**inputs).logits_per_image[0]
            assert row[attribute] == list(by_value)[int(logits.argmax())]
    # a group per template and LoRA setting, its counts a recount of the rows, its intervals Wilson's
    groups = {(row["template"], row["lora"]) for row in rows}
    assert {template for template, _ in groups} == set(TEMPLATES) and len(groups) == 4
    assert {lora for _, lora in groups} == {"none", str(next(r["lora"] for r in rows if r["lora"] != "none"))}
    assert set(record["groups"]) == {row["group"] for row in rows}
    z = 1.959964
    for name, group in record["groups"].items():
        members = [row for row in rows if row["group"] == name]
        assert group["images"] == len(members) == len(JOBS)
        for attribute, by_value in texts.items():
            result = group["attributes"][attribute]
            assert result["counts"] == {v: sum(row[attribute] == v for row in members) for v in by_value}
            for value, count in result["counts"].items():
                n, p = len(members), count / len(members)
                centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
                half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
                assert result["shares"][value] == p
                assert result["intervals"][value] == pytest.approx([max(centre - half, 0), min(centre + half, 1)])
            shares = [s for s in result["shares"].values() if s]
            assert result["evenness"] == pytest.approx(-sum(s * math.log(s) for s in shares) / math.log(len(by_value)))
    assert Image.open(sampled / "audit.png").width > 0


def test_a_bare_audit_reads_the_default_attributes(sampled, tiny_clip, capsys):
    assert audit_folder(sampled, "--score_model", tiny_clip, "--audit") == 0
    record = json.loads((sampled / "audit.json").read_text())
    assert list(record["texts"]) == ["gender", "age", "ethnicity"]
    assert record["texts"]["ethnicity"]["East Asian"] == "a photo of a East Asian person"
    assert list(read_rows(sampled / "audit.csv")[0])[-3:] == ["gender", "age", "ethnicity"]
    assert "ethnicity" in capsys.readouterr().out


def plant(sampled: Path, training_image: Path) -> str:
    """Replace the pixels of the sampled folder's third PNG by a training image, its settings kept: its name."""
    png = sorted(sampled.glob("0*.png"))[2]
    info = PngImagePlugin.PngInfo()
    for key, value in Image.open(png).text.items():
        info.add_text(key, value)
    Image.open(training_image).convert("RGB").save(png, pnginfo=info)
    return png.name


def brute_force(embed, sampled: Path, rows: list, faces: Path) -> list:
    """The nearest training image of each row's PNG, from embeddings computed here, by one full matrix product."""
    training = sorted(faces.rglob("*.png"))
    generated = torch.nn.functional.normalize(embed([sampled / row["file"] for row in rows]), dim=-1)
    similarity = generated @ torch.nn.functional.normalize(embed(training), dim=-1).T
    return [training[int(i)].relative_to(faces).as_posix() for i in similarity.argmax(dim=1)]


def test_a_planted_training_image_is_found_and_flagged_and_the_cache_reused(sampled, face_folder, tiny_clip, capsys):
    planted = plant(sampled, face_folder / "00001" / "00005.png")
    flags = ["--train_data_dir", face_folder, "--score_model", tiny_clip, "--copy_threshold", "0.999"]
    assert audit_folder(sampled, *flags, "--block_size", "3") == 0
    assert "training embeddings: 0 cached, 8 to embed" in capsys.readouterr().out
    rows = read_rows(sampled / "memorization.csv")
    row = next(row for row in rows if row["file"] == planted)
    assert row["nearest"] == "00001/00005.png" and float(row["similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert row["copied"] == "True" and row["rank"] == "1"
    assert [r["file"] for r in rows if r["copied"] == "True"] == [planted]
    record = json.loads((sampled / "memorization.json").read_text())
    assert record["copied"] == [planted] and record["training_images"] == 8
    assert {name: group["images"] for name, group in record["groups"].items()} == dict.fromkeys(record["groups"], 2)

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)

    def embed(paths):
        with torch.no_grad():
            pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
            return model.get_image_features(**pixels).pooler_output

    assert [row["nearest"] for row in rows] == brute_force(embed, sampled, rows, face_folder)
    # one block holding everything: the same answer, every training embedding from the cache
    assert audit_folder(sampled, *flags) == 0
    assert "training embeddings: 8 cached, 0 to embed" in capsys.readouterr().out
    assert read_rows(sampled / "memorization.csv") == rows
    # an image changed: it alone is embedded again
    changed = face_folder / "00000" / "00002.png"
    Image.open(face_folder / "00000" / "00001.png").save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert audit_folder(sampled, *flags) == 0
    assert "training embeddings: 7 cached, 1 to embed" in capsys.readouterr().out
    assert Image.open(sampled / "memorization.png").width > 0


def test_dinov2_embeddings_find_the_planted_image(sampled, face_folder, tiny_dinov2):
    planted = plant(sampled, face_folder / "00000" / "00003.png")
    flags = ["--train_data_dir", face_folder, "--embedding_model", tiny_dinov2, "--copy_threshold", "0.9999"]
    assert audit_folder(sampled, *flags) == 0
    rows = read_rows(sampled / "memorization.csv")
    row = next(row for row in rows if row["file"] == planted)
    assert row["nearest"] == "00000/00003.png" and row["copied"] == "True"
    model, processor = AutoModel.from_pretrained(tiny_dinov2).eval(), BitImageProcessor.from_pretrained(tiny_dinov2)

    def embed(paths):
        with torch.no_grad():
            pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
            return model(**pixels).pooler_output

    assert [row["nearest"] for row in rows] == brute_force(embed, sampled, rows, face_folder)


@pytest.fixture
def text_only(tiny_model, tiny_clip, tmp_path):
    """A CLIP text encoder with a processor: loads, but has no image encoder."""
    folder = shutil.copytree(tiny_model / "text_encoder", tmp_path / "text-encoder")
    for path in [*(tiny_model / "tokenizer").iterdir(), tiny_clip / "processor_config.json"]:
        shutil.copy(path, folder)
    return folder


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("one value", "two values or more"),
        ("empty training folder", "holds no image"),
        ("no image encoder", "without an image encoder"),
        ("no generate.py PNG", "none of its 1 PNG file(s) is an image written by generate.py"),
        ("template without {value}", "has no {value}"),
        ("nothing asked", "nothing to do"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, expected, sampled, tiny_clip, text_only, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    flags = {
        "one value": [sampled, "--audit", "gender=woman", "--score_model", tiny_clip],
        "empty training folder": [sampled, "--train_data_dir", empty, "--score_model", tiny_clip],
        "no image encoder": [sampled, "--train_data_dir", sampled, "--embedding_model", text_only],
        "no generate.py PNG": [empty, "--audit", "--score_model", tiny_clip],
        "template without {value}": [sampled, "--audit", "--audit_template", "a person", "--score_model", tiny_clip],
        "nothing asked": [sampled, "--score_model", tiny_clip],
    }[case]
    if case == "no generate.py PNG":
        Image.new("RGB", (8, 8)).save(empty / "photo.png")
    before = sorted(path.name for path in flags[0].iterdir())
    assert audit_folder(*flags) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert sorted(path.name for path in flags[0].iterdir()) == before
