"""Glue between mirai_plugin and upstream trainers; the patch files call into these modules.

Every glue implements ``TrainerGlue`` (``glue.py``) and stores its state under ``CHECKPOINT_KEY``.
"""

from mirai_plugin.integrations.glue import CHECKPOINT_KEY, TrainerGlue

__all__ = ["CHECKPOINT_KEY", "TrainerGlue"]
