"""Shared fixtures: a tiny SD2.1-shaped pipeline and a captioned face folder, built once per session.

Every test runs offline against a private Hugging Face cache, so nothing reaches the network and
nothing touches the user's own cache.
"""

import os
import shutil
import tempfile

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="t2f-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests compare pixels against CPU fp32 references; a GPU would switch the scripts to fp16.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One torch thread in this process and in every process the tests start: on models this small a second thread
# mostly waits for the first (tests/test_generate.py took 24 s instead of 38 s on two cores), and processes started
# side by side do not fight over the cores. The same thread count everywhere also keeps float sums identical.
os.environ["OMP_NUM_THREADS"] = "1"

from script_server import ScriptServers  # noqa: E402
from tiny_sd21 import build_tiny_clip, build_tiny_sd21, make_face_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a random-weight SD2.1-shaped pipeline in the diffusers layout (read-only: copy to modify)."""
    return build_tiny_sd21(tmp_path_factory.mktemp("tiny-sd21"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Path of a random-weight CLIPModel with its CLIPProcessor, loadable as --score_model (read-only)."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def scripts():
    """Runs `python SCRIPT ARGS` as a process of its own, forked from an interpreter that has imported torch (and, on
    request, diffusers and transformers) already: tests/script_server.py."""
    servers = ScriptServers()
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def _face_folder(tmp_path_factory):
    return make_face_folder(tmp_path_factory.mktemp("faces-template") / "faces", count=8, size=64)


@pytest.fixture
def face_folder(_face_folder, tmp_path):
    """A fresh copy of eight 64x64 captioned faces (nested folders + metadata.jsonl) that a test may edit."""
    return shutil.copytree(_face_folder, tmp_path / "faces")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)
