import pytest
import torch

from nds.config import load_config
from nds.train import EMA, build_level_model, deepspeed_config, patch_size_for


def test_patch_size_keeps_token_grid_small():
    assert patch_size_for(28, 28, 8) == 4
    assert patch_size_for(32, 32, 16) == 2
    assert patch_size_for(4, 4, 8) == 1
    assert patch_size_for(6, 6, 8) == 1
    with pytest.raises(ValueError, match="9x16"):
        patch_size_for(9, 16, 8)  # no common divisor but 1, and 16 > 8


def test_each_level_model_matches_its_spec():
    cfg = load_config(None, ["hierarchy.spec='28x28x1, 4x4x32, 2x2x16'", "hierarchy.L=3", "model.width=32",
                             "model.depth=2", "model.heads=2"])
    bottom, middle, top = (build_level_model(cfg, level) for level in (1, 2, 3))
    assert bottom.input_shape == (28, 28, 1) and bottom.cond_shape == (4, 4, 32)
    assert middle.input_shape == (4, 4, 32) and middle.cond_shape == (2, 2, 16)
    assert top.input_shape == (2, 2, 16) and top.cond_shape is None
    out = bottom(torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), cond=torch.randn(2, 32, 4, 4))
    assert out.shape == (2, 1, 28, 28)


def test_deepspeed_config_follows_training_config():
    cfg = load_config(None, ["training.zero_stage=3", "training.batch_size=8", "training.lr=0.01"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["scheduler"]["params"]["warmup_max_lr"] == 0.01


def test_ema_warms_up_tracks_and_round_trips():
    module = torch.nn.Linear(2, 2)
    ema = EMA(0.999)
    ema.update(module)
    assert torch.equal(ema.shadow["weight"], module.weight.detach())
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)  # decay (1+2)/(10+2) = 0.25 early on, not 0.999
    expected = module.weight.detach() - 1.0 + 0.75
    torch.testing.assert_close(ema.shadow["weight"], expected)
    clone = EMA(0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 2 and torch.equal(clone.shadow["weight"], ema.shadow["weight"])
    last = EMA(0.0)
    last.update(module)
    assert torch.equal(last.shadow["weight"], module.weight.detach())
