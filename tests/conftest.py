import pytest
import torch

from nanoseek import DeepSeekV3, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_model(config: ModelConfig, bias_scale: float = 0.05) -> DeepSeekV3:
    """A random model whose gate biases are non-zero, so routing tests exercise the bias."""
    model = DeepSeekV3(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(0, bias_scale)
    return model
