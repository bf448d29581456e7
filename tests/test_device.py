"""--device: resolved once, refused clearly where it cannot be honoured, and fp32 on a CPU."""

import pytest
import torch
from conftest import random_model

from nanoseek import LLM, ModelConfig
from nanoseek.checkpoint import save_model
from nanoseek.device import default_dtype, resolve_device
from nanoseek.train.loop import TrainConfig, Trainer


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (
        torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    )
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    for bad in ("gpu", "mps", "cuda:x", ""):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"device: 'cuda'.*--device cpu"):
        resolve_device("cuda")
    model = random_model(ModelConfig.preset("tiny"))
    save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="device"):
        LLM(tmp_path / "m", device="cuda:0")
    with pytest.raises(ValueError, match="device"):
        Trainer(model, TrainConfig(steps=1, device="cuda"), tmp_path / "out")


def test_auto_precision_is_fp32_on_a_cpu_and_the_engine_loads_on_the_device_asked(tmp_path):
    model = random_model(ModelConfig.preset("tiny"))
    trainer = Trainer(model, TrainConfig(steps=1, device="cpu"), tmp_path / "out")
    assert trainer.precision == "fp32" and not torch.is_autocast_enabled("cpu")
    with trainer.autocast():
        assert not torch.is_autocast_enabled("cpu")
    save_model(model, tmp_path / "m")
    llm = LLM(tmp_path / "m", device="cpu")
    assert llm.model.device == torch.device("cpu") and llm.model.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="device"):
        LLM(model, device="meta")
