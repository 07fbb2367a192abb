"""finetune_lora.py's disk caches (--cache_latents, --cache_text_embeddings in --encoding_cache_dir): they train as
decoding every step does, bit for bit; a later run encodes nothing; a changed image is encoded again, a damaged
shard rebuilt; two processes build one cache. The kill during cache building is test_finetune_faults.py's pre-emption
test. Real runs on the tiny model throughout."""

import re
import subprocess

import torch
from PIL import Image
from test_finetune_faults import cpu_env, free_port
from train_helpers import accelerate_launch, lora, one_thread, train_args  # noqa: F401  (one_thread: autouse fixture)

import finetune_lora

CACHES = ["--cache_latents", "--cache_text_embeddings"]


def small_run(model, data, output, *extra):
    # One epoch, one image per batch: the cache encodes each image and caption alone, as training without it does, so the
    # latents and hidden states are the same bits (see test_two_processes_share_the_latent_caching_...).
    flags = ["--random_flip", "--train_batch_size", "1", "--max_train_steps", "8", "--checkpointing_steps", "100"]
    return train_args(model, data, output, *flags, "--learning_rate", "1e-2", *extra)


def counts(text: str, what: str) -> tuple:
    found = re.findall(rf"{what}: ([\d,]+) cached, ([\d,]+) to encode", text)
    assert len(found) == 1, text[-3000:]
    return tuple(int(number.replace(",", "")) for number in found[0])


def assert_equal(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_the_disk_caches_train_as_decoding_and_are_reused_renewed_and_repaired(
    tiny_model, face_folder, tmp_path, caplog
):
    cache = tmp_path / "cold" / "encoding_cache"  # the default --encoding_cache_dir of the first run

    def run(name, *extra):
        caplog.clear()
        with caplog.at_level("INFO", logger="finetune_lora"):
            assert finetune_lora.main(small_run(tiny_model, face_folder, tmp_path / name, *CACHES, *extra)) == 0
        return caplog.text, lora(tmp_path / name)

    assert finetune_lora.main(small_run(tiny_model, face_folder, tmp_path / "decoded")) == 0
    log, cold = run("cold")  # 8 images in both flips, 8 captions
    assert counts(log, "latents") == (0, 16) and counts(log, "text embeddings") == (0, 8)
    assert_equal(cold, lora(tmp_path / "decoded"))
    [shard] = (cache / "latents").glob("shard-*.safetensors")

    log, warm = run(
        "warm", "--encoding_cache_dir", cache
    )  # another output folder, the same cache: nothing to encode, the same weights
    assert counts(log, "latents") == (16, 0) and counts(log, "text embeddings") == (8, 0)
    assert_equal(warm, cold)

    image = face_folder / "00000" / "00003.png"
    Image.new("RGB", (64, 64), "gray").save(image)  # new pixels: its two latents are encoded again, nothing else
    log, changed = run("changed", "--encoding_cache_dir", cache)
    assert counts(log, "latents") == (14, 2) and counts(log, "text embeddings") == (8, 0)
    assert sorted(p.name for p in (cache / "latents").glob("*")) != [shard.name]
    assert changed.keys() == cold.keys() and any(not torch.equal(changed[k], cold[k]) for k in cold)

    # A truncated latents shard and a text shard with a broken header are deleted and encoded again.
    shard.write_bytes(shard.read_bytes()[:-100])
    [text_shard] = (cache / "text").glob("shard-*.safetensors")
    text_shard.write_bytes(b"\xff" * 8 + text_shard.read_bytes()[8:])
    log, repaired = run("repaired", "--encoding_cache_dir", cache)
    assert f"deleting {shard}, which does not load (" in log and f"deleting {text_shard}" in log
    assert counts(log, "latents") == (2, 14) and counts(log, "text embeddings") == (0, 8)
    assert_equal(repaired, changed)


def test_two_processes_build_one_cache_and_both_train_from_it(tiny_model, face_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    command = accelerate_launch(
        small_run(tiny_model, face_folder, tmp_path / "two", *CACHES, "--encoding_cache_dir", cache, "--verbose"),
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
    )
    run = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert counts(run.stderr, "latents") == (0, 16) and counts(run.stderr, "text embeddings") == (0, 8)
    assert len(list((cache / "latents").glob("shard-*.safetensors"))) == 2  # each process wrote its share
    checksums = dict(re.findall(r"process (\d)/2 final LoRA checksum: ([0-9a-f]{16})", run.stderr))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"]
    # The cache is complete: one process finds every entry.
    with caplog.at_level("INFO", logger="finetune_lora"):
        argv = small_run(tiny_model, face_folder, tmp_path / "one", *CACHES, "--encoding_cache_dir", cache)
        assert finetune_lora.main(argv) == 0
    assert counts(caplog.text, "latents") == (16, 0) and counts(caplog.text, "text embeddings") == (8, 0)


def test_an_encoding_cache_dir_that_cannot_be_written_fails_before_anything_loads(
    tiny_model, face_folder, tmp_path, capfd
):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    output = tmp_path / "run"
    argv = train_args(tiny_model, face_folder, output, "--cache_latents", "--encoding_cache_dir", a_file / "cache")
    assert finetune_lora.main(argv) == 1
    [line] = capfd.readouterr().err.strip().splitlines()
    assert line == (
        f"error: cannot write to {a_file / 'cache'}: {a_file} is a file, not a folder; pass another --encoding_cache_dir"
    )
    assert not output.exists()


def test_an_image_gone_before_it_is_hashed_gets_a_key_no_entry_has(face_folder):
    names = sorted(str(path.relative_to(face_folder)) for path in face_folder.rglob("*.png"))[:2]
    source = finetune_lora.FolderImages(face_folder, names)
    (face_folder / names[1]).unlink()  # deleted after it was listed, as on a shared file system
    readable, gone = (finetune_lora.image_digest(source, index) for index in range(2))
    assert len(readable) == 64 and gone == "unreadable 1"  # encode_latents then skips it, like any unreadable image
