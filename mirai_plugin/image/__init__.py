"""Mirai for token-autoregressive image generators (LlamaGen): foresight targets on
the 2D token grid from an EMA copy of the model (Mirai-E) or a frozen image encoder
(Mirai-I), one projection head per grid offset, cosine alignment.

Pipeline of one training step::

    capture_hidden(model, l, blocks="layers")    the model's hidden at block l, (b T d)
    EMASource(model, l)(same inputs)             Mirai-E target, causal, (b T d)
    FrozenImageEncoder(dino, grid=(H, W))(img)   Mirai-I target, (b H*W e)
    TokenForesightHead(cfg, d, e, grid)          weight * sum_k w_k * mean cos loss at offset k
"""

from mirai_plugin.image.config import ImageForesightConfig
from mirai_plugin.image.grid import grid_offsets, grid_pairs
from mirai_plugin.image.head import TokenForesightHead
from mirai_plugin.image.sources import EMASource, FrozenImageEncoder

__all__ = [
    "EMASource",
    "FrozenImageEncoder",
    "ImageForesightConfig",
    "TokenForesightHead",
    "grid_offsets",
    "grid_pairs",
]
