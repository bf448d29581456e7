import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import DeepSeekV3, ModelConfig

TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "nanoseek.cli",
]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], capture_output=True, text=True, **kw)


def torchrun(*args) -> None:
    r = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]


def weights(path) -> dict:
    return load_file(Path(path) / "model.safetensors")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny base checkpoint with its tokenizer, pretrained for a few steps on built-in arithmetic."""
    return pretrain_tiny(tmp_path_factory.mktemp("base") / "base")


# `nanoseek pretrain` flags for a tiny model on a small built-in corpus (a later flag overrides one here)
TINY_PRETRAIN_FLAGS = (
    *("--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--num-docs", "400"),
    *("--vocab-size", "400", "--eval-problems", "0", "--eval-every", "0", "--lr", "3e-3", "--warmup", "2"),
)


def pretrain_tiny(out: Path, steps: int = 3, train: dict | None = None, **data) -> Path:
    """A tiny checkpoint with its tokenizer in `out`, pretrained for `steps` steps on a small built-in
    corpus; `data` overrides PretrainConfig fields, `train` TrainConfig ones."""
    from nanoseek.train.loop import TrainConfig
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    fields = dict(preset="tiny", seq_len=64, batch_size=4, num_docs=300, vocab_size=400, eval_problems=0)
    fields.update(eval_every=0, tasks=("arithmetic",))
    pretrain(
        PretrainConfig(**{**fields, **data}),
        TrainConfig(**{"steps": steps, "warmup": 1, **(train or {})}),
        out,
        progress=False,
    )
    return out


def random_model(config: ModelConfig, bias_scale: float = 0.05) -> DeepSeekV3:
    """A random model whose gate biases are non-zero, so routing tests exercise the bias."""
    model = DeepSeekV3(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(0, bias_scale)
    return model


def missing(why: str) -> None:
    """Skip a test whose system package is missing, but fail it under CI=true, where it must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def require_cxx_compiler() -> None:
    """torch.compile's inductor builds its CPU kernels with the system C++ compiler."""
    if shutil.which("g++") is None:
        missing("torch.compile needs g++ (apt-get install g++ python3-dev)")
