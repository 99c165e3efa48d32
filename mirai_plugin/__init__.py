"""mirai_plugin: the Video-Mirai foresight loss for causal video diffusion trainers.

Training only: capture the generator's mid-depth hidden state per segment, ask a
small predictor to match what a frozen bidirectional encoder sees at segments k
and k+1 of the same rollout, and add the cosine loss to the generator loss.
Inference is untouched.
"""

from mirai_plugin.capture import CapturedHidden, HiddenRecord, capture_hidden
from mirai_plugin.config import ForesightConfig
from mirai_plugin.encoder import FrozenEncoder
from mirai_plugin.errors import MiraiError
from mirai_plugin.head import ForesightHead
from mirai_plugin.loss import foresight_loss
from mirai_plugin.targets import SegmentTargets, fuse_targets
from mirai_plugin.version import __version__ as __version__

__all__ = [
    "CapturedHidden",
    "ForesightConfig",
    "ForesightHead",
    "FrozenEncoder",
    "HiddenRecord",
    "MiraiError",
    "SegmentTargets",
    "capture_hidden",
    "foresight_loss",
    "fuse_targets",
]
