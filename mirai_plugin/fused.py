"""Deprecated: ``mirai_plugin.mean_target_cosine`` (renamed in 0.2.0; this alias goes in 0.3.0)."""

import warnings

from mirai_plugin.mean_target_cosine import mean_target_cosine

warnings.warn("mirai_plugin.fused is now mirai_plugin.mean_target_cosine (fused_mean_cosine is mean_target_cosine)",
              DeprecationWarning, stacklevel=2)

fused_mean_cosine = mean_target_cosine

__all__ = ["fused_mean_cosine"]
