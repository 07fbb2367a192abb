"""What the finetune_lora.py tests share: the launcher command line, the small-run flags, reading a LoRA back,
and one torch thread per test process."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_lora

SCRIPT = Path(__file__).resolve().parents[1] / "finetune_lora.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other test processes: one torch thread per process avoids thrashing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def accelerate_launch(script_args, *launcher_args):
    """The command line of `accelerate launch` on CPU, one thread per process, no user config."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_cpu_threads_per_process",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_machines",
        "1",
        *map(str, launcher_args),
        str(SCRIPT),
        *map(str, script_args),
    ]


def train_args(model, data, output, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(output),
        "--resolution",
        "64",
        "--center_crop",
        "--train_batch_size",
        "2",
        "--rank",
        "4",
        "--text_encoder_rank",
        "4",
        "--lr_warmup_steps",
        "0",
        "--report_to",
        "none",
        "--validation_prompts",  # a test that wants grids names its prompts after this
        "none",
        *map(str, extra),
    ]


def lora(path):
    return load_file(path / finetune_lora.LORA_WEIGHTS_NAME)
