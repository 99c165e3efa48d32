"""Names renamed or moved in 0.2.0 still work for one minor version, each with a DeprecationWarning."""

import importlib
import sys

import pytest
import torch

from mirai_plugin import ForesightConfig, ForesightHead
from mirai_plugin.image.config import ImageForesightConfig
from mirai_plugin.image.head import TokenForesightHead


def test_the_fused_module_warns_and_is_the_mean_target_cosine():
    sys.modules.pop("mirai_plugin.fused", None)
    with pytest.warns(DeprecationWarning, match="mirai_plugin.mean_target_cosine"):
        fused = importlib.import_module("mirai_plugin.fused")
    from mirai_plugin.mean_target_cosine import mean_target_cosine

    assert fused.fused_mean_cosine is mean_target_cosine


def test_head_term_warns_and_equals_calling_the_head():
    torch.manual_seed(0)
    head = ForesightHead(ForesightConfig(num_heads=2, segment_frames=1, predictor_depth=1, replay=False), 16, 24)
    hidden = [torch.randn(1, 4, 16, requires_grad=True) for _ in range(3)]
    z = torch.randn(1, 12, 24)
    with pytest.warns(DeprecationWarning, match=r"call the head"):
        old = head.term(hidden, z)
    torch.testing.assert_close(old, head(hidden, z), rtol=0, atol=0)


def test_image_head_target_dim_and_save_warn(tmp_path):
    cfg = ImageForesightConfig(source="ema", projector_dim=8)
    with pytest.warns(DeprecationWarning, match="pass encoder_dim"):
        head = TokenForesightHead(cfg, student_dim=8, target_dim=6, grid=(4, 4))
    with pytest.warns(DeprecationWarning, match="use encoder_dim"):
        assert head.target_dim == head.encoder_dim == 6
    with pytest.warns(DeprecationWarning, match="save_training_state"):
        head.save(tmp_path / "old.pt")
    head.save_training_state(tmp_path / "new.pt")
    old, new = (torch.load(tmp_path / name, weights_only=True) for name in ("old.pt", "new.pt"))
    assert old.keys() == new.keys() and all(torch.equal(old["head"][k], new["head"][k]) for k in new["head"])


def test_collectives_are_still_importable_from_distributed():
    from mirai_plugin import collectives, distributed

    for name in ("world", "log_once", "broadcast_module", "average_gradients", "gather_ints", "gather_messages"):
        assert getattr(distributed, name) is getattr(collectives, name)


def test_an_image_training_state_written_before_0_2_resumes():
    torch.manual_seed(0)
    cfg = ImageForesightConfig(source="ema", projector_dim=8)
    head = TokenForesightHead(cfg, 8, 8, (4, 4))
    head(torch.randn(2, 16, 8), torch.randn(2, 16, 8)).backward()
    head.step()
    legacy = {  # what TokenForesightHead.training_state() wrote: the optimizer's own state_dict, by index
        "format": "mirai_plugin.TokenForesightHead.training_state",
        "head": {k: v.clone() for k, v in head.state_dict().items()},
        "optimizer": head.optimizer.state_dict(),
        "steps_taken": head.steps_taken,
        "config": cfg.to_json(),
    }
    resumed = TokenForesightHead(cfg, 8, 8, (4, 4))
    resumed.load_training_state(legacy)
    assert resumed.steps_taken == 1
    mine, theirs = resumed.optimizer.state_dict()["state"], head.optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index in mine:
        torch.testing.assert_close(mine[index]["exp_avg"], theirs[index]["exp_avg"], rtol=0, atol=0)
