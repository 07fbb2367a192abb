"""tools/hub_dataset.py: a dataset of images and captions written as the image folder finetune_lora.py reads, and
finetune_lora.py's --dataset_name, which moved there, failing in one line that names it."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import finetune_lora

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "hub_dataset.py"
spec = importlib.util.spec_from_file_location("hub_dataset", SCRIPT)
hub_dataset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub_dataset)


def test_a_dataset_becomes_the_folder_training_reads_with_its_files_and_captions(face_folder, tmp_path, capfd):
    # A local imagefolder dataset, flat, as load_dataset reads one: two captions, none, one.
    source = tmp_path / "source"
    source.mkdir()
    files = sorted(face_folder.rglob("*.png"))[:3]
    for number, file in enumerate(files):
        shutil.copy(file, source / f"{number}.png")
    captions = [["a smiling face", "a face"], [], ["an old man"]]
    rows = [{"file_name": f"{number}.png", "text": text} for number, text in enumerate(captions)]
    (source / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    folder = tmp_path / "written"
    assert hub_dataset.main(["imagefolder", str(folder), "--data_dir", str(source)]) == 0
    assert (
        f"(1 rows without an image or a caption left out)\nNext: accelerate launch finetune_lora.py --train_data_dir {folder}"
        in capfd.readouterr().err
    )
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000002.png", "metadata.jsonl"]
    assert (folder / "000002.png").read_bytes() == files[2].read_bytes()  # the file as stored, not decoded again
    args = finetune_lora.parse_args(["--train_data_dir", str(folder), "--validation_prompts", "none"])
    records = finetune_lora.load_records(args, show_progress=False)
    assert records.source.names == ["000000.png", "000002.png"]
    assert records.captions == [["a smiling face", "a face"], ["an old man"]]

    assert hub_dataset.main(["imagefolder", str(folder), "--data_dir", str(source)]) == 1
    assert capfd.readouterr().err == f"error: {folder} exists: pass a new folder\n"
    assert hub_dataset.main(
        ["imagefolder", str(tmp_path / "other"), "--data_dir", str(source), "--caption_column", "x"]
    )
    assert "has no column 'x' (columns: " in capfd.readouterr().err


def test_an_image_training_cannot_read_by_its_suffix_is_written_as_png_and_a_broken_one_is_one_line(tmp_path, capfd):
    assert hub_dataset.TRAINABLE_SUFFIXES == finetune_lora.IMAGE_EXTENSIONS
    source = tmp_path / "source"
    source.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(source / "0.gif")
    (source / "metadata.jsonl").write_text(json.dumps({"file_name": "0.gif", "text": "a red face"}) + "\n")
    folder = tmp_path / "written"
    assert hub_dataset.main(["imagefolder", str(folder), "--data_dir", str(source)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "metadata.jsonl"]
    assert Image.open(folder / "000000.png").convert("RGB").getpixel((3, 3)) == Image.open(source / "0.gif").convert(
        "RGB"
    ).getpixel((3, 3))

    (source / "0.gif").write_bytes(b"GIF89a, then nothing")
    broken = tmp_path / "broken"
    assert hub_dataset.main(["imagefolder", str(broken), "--data_dir", str(source)]) == 1
    line = capfd.readouterr().err.splitlines()[-1]  # after the datasets library's progress bar
    assert line == "error: row 0: 0.gif cannot be read as an image; fix or remove that row"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "written"]  # no folder, no staging left


@pytest.mark.parametrize("flag", ["--dataset_name", "--dataset_config_name=faces"])
def test_dataset_name_moved_and_says_where_in_one_line(flag, capfd):
    with pytest.raises(SystemExit) as stopped:
        finetune_lora.parse_args([flag, "lambdalabs/naruto-blip-captions"])
    assert stopped.value.code == 2
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"error: {flag.split('=')[0]} moved: ") and "python tools/hub_dataset.py" in line
