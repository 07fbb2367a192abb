"""finetune_lora.py on the tiny SD2.1-shaped model: the README command, what each flag promises, bad input.

Runs where the launcher is the point go through a real `accelerate launch` subprocess; the others call
`finetune_lora.main([...])` in-process, which is the same code path without the interpreter start-up.
"""

import csv
import http.server
import io
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import SCRIPT, accelerate_launch, lora, one_thread, train_args  # noqa: F401  (one_thread: autouse fixture)

import finetune_lora
import generate

PROMPTS = ["a young woman with long red hair smiles", "an old man with gray hair and a beard"]


def part(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_readme_command_runs_under_accelerate_launch_and_its_lora_changes_the_image(tiny_model, face_folder, tmp_path):
    output = tmp_path / "run"
    readme_command = [
        "--pretrained_model_name_or_path",
        tiny_model,
        "--train_data_dir",
        face_folder,
        "--train_text_encoder",
        "--checkpointing_steps",
        "2",
        "--resolution",
        "64",
        "--center_crop",
        "--train_batch_size",
        "2",
        "--num_train_epochs",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--gradient_checkpointing",
        "--num_validation_images",
        "2",
        "--learning_rate",
        "1e-3",
        "--learning_rate_text_encoder",
        "1e-3",
        "--max_grad_norm",
        "1",
        "--rank",
        "4",
        "--text_encoder_rank",
        "4",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--output_dir",
        output,
        "--resume_from_checkpoint",
        "latest",
        "--validation_prompts",
        *PROMPTS,
    ]
    secret = "hf_NotARealTokenButItMustNotLeak"
    run = subprocess.run(
        accelerate_launch(readme_command, "--num_processes", "1"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_TOKEN": secret},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8 images found" in run.stderr and "8 with captions" in run.stderr

    # 8 images / batch 2 = 4 steps per epoch, 2 epochs; a checkpoint every 2 steps.
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
        "logs",
        "pytorch_lora_weights.safetensors",
        "training_settings.json",
        "validation",
    ]
    for checkpoint in output.glob("checkpoint-*"):
        assert sorted(p.name for p in checkpoint.iterdir()) == [
            "optimizer.bin",
            "pytorch_lora_weights.safetensors",
            "random_states_0.pkl",
            "scheduler.bin",
            "training_settings.json",
            "validation.json",
            "validation.png",
        ]
    # Grids at step 0 and the end; the checkpoints' are in their folders (no epoch grids without --validation_epochs).
    assert sorted(p.name for p in (output / "validation").glob("*.png")) == ["step-000000.png", "step-000008.png"]

    settings = json.loads((output / "training_settings.json").read_text())
    assert (settings["global_step"], settings["rank"], settings["lora_alpha"]) == (8, 4, 4)
    assert settings["base_model"] == str(tiny_model) and settings["text_encoder_lora_alpha"] == 4
    with safe_open(output / "pytorch_lora_weights.safetensors", "pt") as handle:
        adapters = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (
        adapters["unet.r"],
        adapters["unet.lora_alpha"],
        adapters["text_encoder.r"],
        adapters["text_encoder.lora_alpha"],
    ) == (4, 4, 4, 4)

    # The grid: rows are repetitions with different seeds, columns the prompts, the images at the bottom right.
    grid = np.asarray(Image.open(output / "checkpoint-8" / "validation.png")).astype(int)
    height, width, _ = grid.shape
    assert height > 2 * 64 and width > 2 * 64
    images = grid[height - 2 * 64 :, width - 2 * 64 :]
    assert np.abs(images[:64] - images[64:]).mean() > 1
    assert json.loads((output / "checkpoint-8" / "validation.json").read_text())["columns (prompts)"] == PROMPTS
    assert list((output / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert not [p for p in output.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    card = (output / "README.md").read_text()
    assert (
        f"base_model: {tiny_model}" in card
        and "rank 4" in card
        and "8 steps" in card
        and "validation/step-000008.png" in card
    )

    # The final LoRA is the last checkpoint's, and generate.py loads it and changes the image with it.
    final = lora(output)
    assert final.keys() == lora(output / "checkpoint-8").keys()
    assert all(torch.equal(final[k], lora(output / "checkpoint-8")[k]) for k in final)
    images = {}
    for name, lora_flags in (("base", ["--lora", "none"]), ("lora", ["--lora", str(output)])):
        assert (
            generate.main(
                [
                    "--prompt",
                    PROMPTS[0],
                    "--base_model",
                    str(tiny_model),
                    *lora_flags,
                    "--steps",
                    "4",
                    "--height",
                    "64",
                    "--width",
                    "64",
                    "--output_dir",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
        images[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png")))).astype(int)
    assert np.abs(images["base"] - images["lora"]).mean() > 1


def test_checkpoints_hold_only_lora_weights_in_the_published_layout(tiny_model, face_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    output = tmp_path / "run"
    assert (
        finetune_lora.main(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--train_text_encoder",
                "--max_train_steps",
                "1",
                "--checkpointing_steps",
                "1",
            )
        )
        == 0
    )
    checkpoint = output / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.bin",
        "pytorch_lora_weights.safetensors",
        "random_states_0.pkl",
        "scheduler.bin",
        "training_settings.json",
    ]
    tensors = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    lora_size = sum(t.numel() for t in tensors.values())
    base_unet = load_file(next((tiny_model / "unet").glob("*.safetensors")))
    assert lora_size < sum(t.numel() for t in base_unet.values()) / 10
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(tensors)

    # The text encoder's keys as the published LoRA spells them (transformers 4's text_model level), and
    # diffusers maps every one of them into this transformers-5 text encoder.
    text_encoder_keys = [k for k in tensors if not k.startswith("unet.")]
    assert text_encoder_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_encoder_keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(output, adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.text_encoder, adapter_name="trained")
    assert {f"text_encoder.text_model.{k}" for k in loaded} == set(text_encoder_keys)
    assert all(torch.equal(v, tensors[f"text_encoder.text_model.{k}"]) for k, v in loaded.items())

    # A checkpoint written before the published layout (no text_model level) still resumes.
    with safe_open(checkpoint / "pytorch_lora_weights.safetensors", "pt") as handle:
        metadata = handle.metadata()
    save_file(
        {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in tensors.items()},
        checkpoint / "pytorch_lora_weights.safetensors",
        metadata=metadata,
    )
    assert (
        finetune_lora.main(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--train_text_encoder",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "100",
                "--resume_from_checkpoint",
                "checkpoint-1",
            )
        )
        == 0
    )
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 2


@pytest.mark.parametrize("frozen", ["unet", "text_encoder"])
def test_a_zero_learning_rate_freezes_only_that_lora(tiny_model, face_folder, tmp_path, frozen):
    output = tmp_path / "run"
    rates = {
        "unet": ["--learning_rate", "0", "--learning_rate_text_encoder", "1e-2"],
        "text_encoder": ["--learning_rate", "1e-2", "--learning_rate_text_encoder", "0"],
    }[frozen]
    assert (
        finetune_lora.main(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--train_text_encoder",
                "--gradient_checkpointing",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                *rates,
            )
        )
        == 0
    )
    after_one, after_two = lora(output / "checkpoint-1"), lora(output)
    moving = "text_encoder." if frozen == "unet" else "unet."
    for key, value in part(after_two, f"{frozen}.").items():
        assert torch.equal(value, after_one[key]), key
        if ".lora_B." in key:
            assert not value.any(), f"{key} left its zero initialisation"
    assert part(after_two, moving)
    for key, value in part(after_two, moving).items():
        assert not torch.equal(value, after_one[key]), f"{key} did not train"


def test_max_train_steps_stops_exactly_there(tiny_model, face_folder, tmp_path):
    output = tmp_path / "run"
    assert (
        finetune_lora.main(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--max_train_steps",
                "3",
                "--checkpointing_steps",
                "1",
                "--num_train_epochs",
                "5",
            )
        )
        == 0
    )
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 3
    scheduler = torch.load(output / "checkpoint-3" / "scheduler.bin", weights_only=False)
    assert scheduler["last_epoch"] == 3


def write_captions(path: Path, kind: str, captions: dict):
    """Write {relative image path: caption or list} in one of the supported caption-file formats."""
    if kind == "json-object":
        path.write_text(json.dumps({Path(name).name: caption for name, caption in captions.items()}))
    elif kind == "json-records":
        path.write_text(json.dumps([{"file_name": name, "text": caption} for name, caption in captions.items()]))
    elif kind == "jsonl-custom-columns":
        path.write_text(
            "".join(json.dumps({"path": name, "description": caption}) + "\n" for name, caption in captions.items())
        )
    elif kind in ("csv", "metadata.csv"):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "text"])
            writer.writerows(captions.items())


@pytest.mark.parametrize(
    "kind, file_name",
    [
        ("json-object", "captions.json"),
        ("json-records", "captions.json"),
        ("jsonl-custom-columns", "captions.jsonl"),
        ("csv", "captions.csv"),
        ("metadata.csv", "metadata.csv"),
    ],
)
def test_every_captions_file_format_is_read(face_folder, tmp_path, caplog, kind, file_name):
    records = [json.loads(line) for line in (face_folder / "metadata.jsonl").read_text().splitlines()]
    (face_folder / "metadata.jsonl").unlink()
    captions = {r["file_name"]: r["text"] for r in records}
    if kind == "json-object":
        captions[records[0]["file_name"]] = ["first caption", "second caption"]
    Image.new("RGB", (64, 64)).save(face_folder / "00001" / "uncaptioned.png")
    captions["00009/missing.png"] = "a caption whose image is gone"
    target = face_folder / file_name if kind == "metadata.csv" else tmp_path / file_name
    write_captions(target, kind, captions)

    argv = ["--train_data_dir", str(face_folder), "--output_dir", str(tmp_path / "out")]
    if kind != "metadata.csv":
        argv += ["--captions_file", str(target)]
    if kind == "jsonl-custom-columns":
        argv += ["--image_column", "path", "--caption_column", "description"]
    with caplog.at_level("INFO", logger="finetune_lora"):
        loaded = finetune_lora.load_records(finetune_lora.parse_args(argv), show_progress=False)

    assert sorted(loaded.source.names) == sorted(r["file_name"] for r in records)
    by_name = dict(zip(loaded.source.names, loaded.captions, strict=True))
    assert by_name[records[1]["file_name"]] == [records[1]["text"]]
    assert "9 images found" in caplog.text and "8 with captions" in caplog.text
    assert "1 images without captions" in caplog.text and "1 captions without an image" in caplog.text
    assert "uncaptioned.png" in caplog.text and "missing.png" in caplog.text
    if kind == "json-object":
        dataset = finetune_lora.CaptionedImages(loaded, 64, True, False)
        index = loaded.source.names.index(records[0]["file_name"])
        drawn = {dataset.draw(index, seed)[0] for seed in range(20)}
        assert drawn == {"first caption", "second caption"}


def test_records_without_a_caption_or_an_image_name_are_skipped_and_counted(face_folder, tmp_path, caplog):
    metadata = face_folder / "metadata.jsonl"
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    del records[3]["text"]
    records[5]["text"] = None
    records.append({"text": "a caption that names no image"})
    metadata.write_text("".join(json.dumps(record) + "\n" for record in records))
    with caplog.at_level("INFO", logger="finetune_lora"):
        loaded = finetune_lora.load_records(
            finetune_lora.parse_args(["--train_data_dir", str(face_folder), "--output_dir", str(tmp_path / "out")]),
            show_progress=False,
        )
    assert sorted(loaded.source.names) == sorted(r["file_name"] for i, r in enumerate(records[:8]) if i not in (3, 5))
    assert "8 images found" in caplog.text and "6 with captions" in caplog.text
    assert "2 images without captions (skipped)" in caplog.text
    assert "1 caption records without an image name (skipped)" in caplog.text and "#9" in caplog.text


def test_training_pixels_are_read_as_the_eye_sees_them_and_a_decompression_bomb_is_skipped(tmp_path, caplog):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(folder / "grey16.png")  # mode I;16, mid-grey
    # Wider than high, black on the left; EXIF orientation 6 shows it turned a quarter clockwise: black on top.
    sideways = np.zeros((64, 96, 3), dtype=np.uint8)
    sideways[:, 48:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 million pixels in 48 kB
    names = ["grey16.png", "rotated.jpg", "bomb.png"]
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": "a face"}) + "\n" for n in names)
    )
    argv = ["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "out")]
    with caplog.at_level("INFO", logger="finetune_lora"):
        loaded = finetune_lora.load_records(finetune_lora.parse_args(argv), show_progress=False)
    assert loaded.source.names == ["grey16.png", "rotated.jpg"]
    assert "1 unreadable images (skipped)" in caplog.text and "bomb.png" in caplog.text
    dataset = finetune_lora.CaptionedImages(loaded, 64, True, False)
    grey = dataset[0, 0]["pixel_values"]
    assert grey.shape == (3, 64, 64) and abs(grey.mean().item()) < 0.01  # 32768 / 65535 of full scale, not white
    rotated = dataset[1, 0]["pixel_values"]
    assert rotated[:, :8].mean() < -0.95 and rotated[:, -8:].mean() > 0.95


def test_two_caption_rows_that_disagree_about_an_image_are_refused(face_folder, tmp_path, capfd):
    metadata = face_folder / "metadata.jsonl"
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    same, other = dict(records[0]), {"file_name": records[1]["file_name"], "text": "someone else"}
    metadata.write_text("".join(json.dumps(record) + "\n" for record in [*records, same, other]))
    args = ["--train_data_dir", str(face_folder), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(finetune_lora.TrainingError) as refused:
        finetune_lora.load_records(finetune_lora.parse_args(args), show_progress=False)
    assert str(refused.value) == (
        f"captions file {metadata} gives {records[1]['file_name']} two different captions (record {len(records) + 2}): "
        "keep one row per image, with a list of captions if it has several"
    )


@pytest.mark.parametrize("cache", [[], ["--cache_latents"]], ids=["decoded-per-step", "cache-latents"])
def test_a_corrupt_and_a_truncated_image_are_skipped_and_named(tiny_model, face_folder, tmp_path, caplog, cache):
    records = [json.loads(line) for line in (face_folder / "metadata.jsonl").read_text().splitlines()]
    (face_folder / "00000" / "broken.png").write_bytes(b"this is not an image")
    whole = (face_folder / records[0]["file_name"]).read_bytes()
    (face_folder / "00001" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    captions = tmp_path / "captions.csv"
    write_captions(
        captions,
        "csv",
        {
            **{r["file_name"]: r["text"] for r in records},
            "00000/broken.png": "a broken face",
            "00001/truncated.png": "half a face",
        },
    )
    output = tmp_path / "run"
    # 9 readable headers, batch 2: one epoch of 5 steps draws every record, the truncated one included.
    assert (
        finetune_lora.main(
            train_args(
                tiny_model,
                face_folder,
                output,
                "--captions_file",
                captions,
                "--num_train_epochs",
                "1",
                "--checkpointing_steps",
                "100",
                *cache,
            )
        )
        == 0
    )
    assert "10 images found" in caplog.text and "1 unreadable images (skipped)" in caplog.text
    assert "unreadable images: 00000/broken.png" in caplog.text
    assert "skipping unreadable image 00001/truncated.png" in caplog.text
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 5


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_model, face_folder, tmp_path, capfd):
    output = tmp_path / "run"
    # Adam moves every weight by about the learning rate: 1e30 overflows the second forward pass.
    code = finetune_lora.main(
        train_args(
            tiny_model,
            face_folder,
            output,
            "--learning_rate",
            "1e30",
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "1",
        )
    )
    err = capfd.readouterr().err
    assert code == 1
    assert "the loss became nan at step 2" in err and "checkpoint-1" in err
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-1"]
    assert finetune_lora.is_complete_checkpoint(output / "checkpoint-1")
    assert all(torch.isfinite(t).all() for t in lora(output / "checkpoint-1").values())
    assert not (output / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize(
    "problem",
    [
        "missing folder",
        "empty folder",
        "no captions",
        "unknown column",
        "resolution",
        "named checkpoint missing",
        "hub unreachable",
    ],
)
def test_bad_input_gets_one_line_and_a_non_zero_exit(tiny_model, face_folder, tmp_path, capfd, problem):
    model, data, extra = tiny_model, face_folder, []
    if problem == "missing folder":
        data = tmp_path / "nowhere"
    elif problem == "empty folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif problem == "no captions":
        (face_folder / "metadata.jsonl").unlink()
    elif problem == "unknown column":
        extra = ["--caption_column", "caption"]
    elif problem == "resolution":
        extra = ["--resolution", "60"]
    elif problem == "named checkpoint missing":
        extra = ["--resume_from_checkpoint", "checkpoint-7"]
    else:
        extra = ["--push_to_hub"]  # the tests run with HF_HUB_OFFLINE=1: it must fail before training, not after
    assert finetune_lora.main(train_args(model, data, tmp_path / "run", *extra)) == 1
    err_lines = capfd.readouterr().err.strip().splitlines()
    errors = [line for line in err_lines if line.startswith("error: ")]
    assert len(errors) == 1 and err_lines[-1] == errors[0]
    assert not any("Traceback" in line for line in err_lines)
    expected = {
        "missing folder": "is not a folder",
        "empty folder": "no images",
        "no captions": "no captions",
        "unknown column": "no column 'caption'",
        "resolution": "not a positive multiple of 8",
        "named checkpoint missing": "checkpoint-7 does not exist",
        "hub unreachable": "cannot create Hub repo",
    }[problem]
    assert expected in errors[0]
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--snr_gamma", "0"], "--snr_gamma 0.0 must be more than 0"),
        (["--learning_rate", "-0.5"], "--learning_rate -0.5 must be 0 or more"),
        (["--learning_rate_text_encoder", "nan"], "--learning_rate_text_encoder nan must be 0 or more"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps -1 must be 0 or more"),
        (["--dataloader_num_workers", "-3"], "--dataloader_num_workers -3 must be 0 or more"),
        (["--max_grad_norm", "0"], "--max_grad_norm 0.0 must be more than 0"),
        (["--adam_beta2", "1"], "--adam_beta2 1.0 must be at least 0 and below 1"),
    ],
)
def test_out_of_range_values_get_one_line_before_anything_loads(tmp_path, capfd, flags, message):
    assert finetune_lora.main(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"), *flags]) == 1
    assert capfd.readouterr().err.strip().splitlines()[0].startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_scheduler", "cosine_annealing"], "error: argument --lr_scheduler: invalid choice: 'cosine_annealing'"),
        (["--rank", "four"], "error: argument --rank: invalid int value: 'four'"),
        (["--no_such_flag"], "error: unrecognized arguments: --no_such_flag"),
    ],
)
def test_a_bad_flag_gets_one_line_and_exit_code_2(tmp_path, capfd, flags, message):
    with pytest.raises(SystemExit) as exit:
        finetune_lora.main(["--train_data_dir", str(tmp_path), *flags])
    assert exit.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message) and err[0].endswith("(see --help)")


def test_an_error_without_a_message_still_gets_a_line():
    assert finetune_lora.first_line(OSError()) == "OSError"
    assert finetune_lora.first_line(OSError("disk full\n  at block 7")) == "disk full"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_atomic_write_replaces_whole_or_leaves_the_old_one(tmp_path, kind):
    target = tmp_path / "checkpoint-2"

    def write(path, text):
        if kind == "folder":
            path.mkdir()
            path = path / "weights"
        path.write_text(text)

    def read(path):
        return (path / "weights" if kind == "folder" else path).read_text()

    with finetune_lora.atomic_write(target) as staging:
        write(staging, "old")
    with pytest.raises(RuntimeError), finetune_lora.atomic_write(target) as staging:
        write(staging, "half")
        raise RuntimeError("killed while writing")
    assert read(target) == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    with finetune_lora.atomic_write(target) as staging:
        write(staging, "new")
    assert read(target) == "new" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A Hub on 127.0.0.1 that creates any repo and then refuses every upload, as a token without write access does."""

    def do_POST(self):
        if self.path == "/api/repos/create":
            self.answer(200, {"url": f"http://127.0.0.1:{self.server.server_port}/tester/text2face"})
        else:
            self.answer(403, {"error": "You don't have the rights to write to this repository"})

    do_GET = do_HEAD = do_PUT = do_POST

    def answer(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_failed_upload_after_training_is_one_line_and_keeps_the_lora(scripts, tiny_model, face_folder, tmp_path):
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    output = tmp_path / "run"
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "hf_NotARealToken",
        "NO_PROXY": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    try:
        args = train_args(
            tiny_model,
            face_folder,
            output,
            "--max_train_steps",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "tester/text2face",
        )
        run = scripts.run(SCRIPT, args, env=env, timeout=300)  # a process of its own: tests/script_server.py
    finally:
        hub.shutdown()
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training finished, but the upload to tester/text2face failed")
    assert f"hf upload tester/text2face {output} ." in last
    assert json.loads((output / "training_settings.json").read_text())["global_step"] == 1
    assert (output / "pytorch_lora_weights.safetensors").is_file()


def test_under_bf16_mixed_precision_the_lora_trains_and_is_saved_in_fp32(scripts, tiny_model, face_folder, tmp_path):
    # A process of its own: accelerate's precision is fixed per process, and the other tests run in fp32. Forked from
    # an interpreter that has imported accelerate, not used it (tests/script_server.py).
    output = tmp_path / "run"
    run = scripts.run(
        SCRIPT,
        [
            *train_args(
                tiny_model,
                face_folder,
                output,
                "--train_text_encoder",
                "--mixed_precision",
                "bf16",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--learning_rate",
                "1e-2",
                "--validation_prompts",
                PROMPTS[0],
                "--num_validation_images",
                "1",
            ),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        libraries=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    after_one, final = lora(output / "checkpoint-1"), lora(output)
    assert {t.dtype for t in final.values()} == {torch.float32}
    assert all(not torch.equal(final[k], after_one[k]) for k in final if ".lora_B." in k)
    width, height = Image.open(output / "checkpoint-1" / "validation.png").size
    assert width > 64 and height > 64  # one image and its labels


class FailingValidation(finetune_lora.Validation):
    """Validation whose sampling runs out of memory, as a too-large grid would on a GPU."""

    def sample(self, step):
        if step > 0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        super().sample(step)


def test_an_error_in_validation_at_a_checkpoint_is_not_reported_as_a_full_disk(
    tiny_model, face_folder, tmp_path, capfd, monkeypatch
):
    monkeypatch.setattr(finetune_lora, "Validation", FailingValidation)
    args = train_args(tiny_model, face_folder, tmp_path / "run", "--max_train_steps", "1", "--checkpointing_steps", "1")
    args[len(args) - 1 - args[::-1].index("none")] = "a face"  # the --validation_prompts of train_args
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune_lora.main([*args, "--num_validation_images", "1"])
    assert "make room" not in capfd.readouterr().err
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_a_short_run_validates_at_its_checkpoints_and_says_once_that_long_texts_are_cut(
    tiny_model, face_folder, tmp_path, capfd, caplog
):
    metadata = face_folder / "metadata.jsonl"
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    records[0]["text"] = "a smiling face " * 40  # 120 CLIP tokens
    metadata.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / "run"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "6", "--checkpointing_steps", "3")
    args[args.index("--validation_prompts") + 1 : args.index("--validation_prompts") + 2] = ["a face " * 50, "a face"]
    args += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    capfd.readouterr()
    with caplog.at_level("INFO"):
        assert finetune_lora.main(args) == 0
    err = caplog.text + capfd.readouterr().err.replace("\r", "\n")  # the script's log, and the libraries' prints
    cut = [line for line in err.splitlines() if "CLIP" in line or "truncated" in line or "Token indices" in line]
    assert len(cut) == 1 and "2 of 10 captions and validation prompts are longer than the 77 CLIP tokens" in cut[0], cut
    # Four steps an epoch: no grid at an epoch's end unless --validation_epochs asks for one.
    assert re.findall(r"Sampling the validation grid of step (\d+)", err) == ["0", "3", "6"]
    assert sorted(p.name for p in (output / "validation").glob("*.png")) == ["step-000000.png", "step-000006.png"]
    assert (output / "checkpoint-3" / "validation.png").is_file()


def test_the_progress_bar_leaves_validation_out_of_its_rate_and_time(tiny_model, face_folder, tmp_path, capfd, caplog):
    output = tmp_path / "run"
    args = train_args(tiny_model, face_folder, output, "--max_train_steps", "4", "--checkpointing_steps", "1")
    args[args.index("--validation_prompts") + 1] = "a face"
    args += ["--num_validation_images", "4", "--validation_inference_steps", "10"]
    capfd.readouterr()
    with caplog.at_level("INFO"):
        assert finetune_lora.main(args) == 0
    bar = [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("steps: 100%")]
    minutes, seconds = map(int, re.search(r"\[(\d+):(\d+)<", bar[-1]).groups())
    validation = int(re.search(r"Validation took (\d+) s of the \d+ s", caplog.text)[1])
    # A grid after each of the 4 steps: counted in, they would be most of the bar's time.
    assert 60 * minutes + seconds < validation / 2, (bar[-1], validation)


def test_the_bar_leaves_out_a_pause_and_keeps_the_fast_steps_around_it():
    from tqdm.auto import tqdm

    with tqdm(total=40, file=io.StringIO()) as bar:  # tqdm prints at most every 0.1 s: most steps are not printed
        for step in range(40):
            time.sleep(0.025)
            bar.update(1)
            if step == 19:  # a 2 s checkpoint after 0.5 s of steps
                paused = time.perf_counter()
                time.sleep(2)
                finetune_lora.leave_out_of_bar(bar, paused)
        elapsed = bar.format_dict["elapsed"]
    assert 0.9 < elapsed < 2.5, elapsed  # the 1 s of steps: not 0 (the steps dropped), not 3 (the pause counted)
