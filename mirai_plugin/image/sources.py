"""Where Mirai's image targets come from: an EMA copy of the model (Mirai-E) or a
frozen bidirectional image encoder (Mirai-I).

Legend: b batch, T = prefix + tokens sequence positions, d model width,
p encoder patches, e encoder width, H/W the token grid.

Neither is an ``nn.Module``: assigning one to a trainer's model cannot add its
weights to the model's ``state_dict()``, optimizer or DDP/FSDP wrap.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirai_plugin.blocks import find_blocks
from mirai_plugin.encoder import FrozenEncoder, _innermost
from mirai_plugin.errors import MiraiError


class EMASource:
    """Mirai-E's target: a frozen EMA copy of the model up to ``blocks[layer]``, run causally
    on the same inputs as the model; its output at ``blocks[layer]`` is the target.

    The copy keeps the embeddings and blocks ``0..layer`` only (later blocks are never
    run) and starts equal to the model. Call ``update(model)`` after every optimizer
    step; the official recipe uses the EMA targets only after a warm-up
    (``ImageForesightConfig(weight_start=...)``).

    Args:
        model: the AR model (bare, DDP or ``torch.compile``; build the source before
            FSDP sharding).
        layer: 0-based block index (the head's ``student_layer``).
        decay: EMA decay per update (official 0.9999).
        blocks: the block list's name when it is not ``.blocks`` (LlamaGen: ``"layers"``).

    Example:
        >>> import torch, torch.nn as nn
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        ...     def forward(self, x):
        ...         for layer in self.layers:
        ...             x = layer(x)
        ...         return x
        >>> model = Tiny()
        >>> source = EMASource(model, layer=1, decay=0.5, blocks="layers")
        >>> source(torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 4])
        >>> len(source.model.layers)  # blocks after `layer` are not kept
        2
    """

    def __init__(self, model: nn.Module, layer: int, *, decay: float = 0.9999, blocks: str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise MiraiError(f"decay must be in [0, 1), got {decay!r}")
        inner = _innermost(model)
        if any(hasattr(m, "_fsdp_wrapped_module") or hasattr(m, "_get_fsdp_state") for m in (model, inner)):
            raise MiraiError("build EMASource from the unsharded model, before wrapping it with FSDP")
        block_list, location = find_blocks(inner, blocks)
        if not 0 <= layer < len(block_list):
            raise MiraiError(f"layer {layer} out of range: {location} has {len(block_list)} blocks")
        ema = copy.deepcopy(inner)
        ema_blocks, _ = find_blocks(ema, blocks)
        del ema_blocks[layer + 1 :]  # never run: the forward stops after blocks[layer]
        self.model = ema.requires_grad_(False).eval()
        self.decay = decay
        self.layer = layer
        self._encoder = FrozenEncoder(self.model, layer, blocks=blocks)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """The EMA model's ``blocks[layer]`` output for the model's own inputs, detached."""
        return self._encoder(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for every parameter the copy keeps."""
        decay = self.decay if decay is None else decay
        current = dict(_innermost(model).named_parameters())
        for name, param in self.model.named_parameters():
            source = current.get(name)
            if source is None:
                raise MiraiError(f"the model has no parameter {name!r}: pass the model this source was built from")
            param.mul_(decay).add_(source.detach().to(param.dtype), alpha=1 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)


class FrozenImageEncoder:
    """Mirai-I's target: a frozen bidirectional image encoder's patch features on the
    token grid.

    The encoder runs under ``no_grad`` in eval mode. Its patch features ``(b p e)`` are
    laid out on the encoder's own square grid (or ``encoder_grid``) and, when that
    differs from the token grid, resized bilinearly to it; the result is
    ``(b H*W e)`` in raster order.

    Args:
        model: the encoder (e.g. DINOv2-B); not modified.
        grid: the AR model's token grid ``(H, W)`` (16x16 for 256 px and a 16x VQ).
        features: ``features(model, images) -> (b p e)`` patch tokens without class or
            register tokens; default ``model(images)``. For DINOv2:
            ``lambda m, x: m.forward_features(x)["x_norm_patchtokens"]``.
        encoder_grid: the encoder's patch grid when it is not square.

    Example:
        >>> import torch, torch.nn as nn
        >>> patchify = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2))  # 32 px -> 8x8 patches
        >>> encoder = FrozenImageEncoder(patchify, grid=(4, 4), features=lambda m, x: m(x).transpose(1, 2))
        >>> encoder(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        grid: tuple[int, int],
        features: Callable[[nn.Module, Tensor], Tensor] | None = None,
        encoder_grid: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MiraiError(f"FrozenImageEncoder wraps an nn.Module, got {type(model).__name__}")
        self.model = model
        self.grid = tuple(grid)
        self.encoder_grid = tuple(encoder_grid) if encoder_grid is not None else None
        self._features = features or (lambda m, x: m(x))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            patches = self._features(self.model, images)
        finally:
            self.model.train(was_training)
        if not isinstance(patches, Tensor) or patches.dim() != 3:
            shape = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
            raise MiraiError(f"the encoder features must be (batch, patches, width), got {shape}; pass features=")
        b, p, e = patches.shape
        gh, gw = self.encoder_grid or (math.isqrt(p), math.isqrt(p))
        if gh * gw != p:
            raise MiraiError(
                f"{p} patch features do not form a square grid (class or register tokens left in?); "
                f"drop them in features= or pass encoder_grid="
            )
        if (gh, gw) == self.grid:
            return patches.detach()
        square = patches.transpose(1, 2).reshape(b, e, gh, gw).float()
        resized = F.interpolate(square, size=self.grid, mode="bilinear", align_corners=False)
        return resized.flatten(2).transpose(1, 2).to(patches.dtype)  # (b H*W e)
