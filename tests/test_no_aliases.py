"""Names renamed before any release are gone; states written by earlier code still read."""

import pytest
import torch

from mirai_plugin import ForesightHead
from mirai_plugin.image.config import ImageForesightConfig
from mirai_plugin.image.head import TokenForesightHead


def test_names_renamed_before_any_release_are_gone():
    """Nothing was released under the old names, so no alias keeps them: calling one fails, naming nothing else."""
    assert not hasattr(ForesightHead, "term")  # call the head
    with pytest.raises(TypeError, match="target_dim"):
        TokenForesightHead(ImageForesightConfig(source="ema", projector_dim=8), student_dim=8, target_dim=6,
                           grid=(4, 4))
    assert not hasattr(TokenForesightHead, "target_dim") and not hasattr(TokenForesightHead, "save")
    from mirai_plugin.integrations.llamagen import LlamaGenMirai

    assert not {"begin", "after_step", "log"} & set(dir(LlamaGenMirai))


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
