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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirai_plugin.blocks import find_blocks
from mirai_plugin.checks import Rule, check, check_tensor, fail, is_int
from mirai_plugin.encoder import FrozenEncoder
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import state_problems
from mirai_plugin.wrappers import unwrap


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
        decay = check("decay", decay, Rule("number", minimum=0, below=1, fix="the official recipe uses 0.9999"))
        if not isinstance(model, nn.Module):
            raise MiraiError(f"EMASource copies an nn.Module (the AR model), got {type(model).__name__}")
        inner = unwrap(model)
        if any(hasattr(m, "_fsdp_wrapped_module") or hasattr(m, "_get_fsdp_state") for m in (model, inner)):
            raise MiraiError("build EMASource from the unsharded model, before wrapping it with FSDP")
        block_list, location = find_blocks(inner, blocks)
        if not is_int(layer) or not 0 <= layer < len(block_list):
            raise MiraiError(
                f"layer {layer!r} out of range: {location} has {len(block_list)} blocks (0..{len(block_list) - 1}); "
                f"layers are 0-based block indices"
            )
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
        decay = self.decay if decay is None else check("decay", decay, Rule("number", minimum=0, below=1))
        if not isinstance(model, nn.Module):
            raise MiraiError(
                f"update needs the model this source was built from (an nn.Module), got {type(model).__name__}"
            )
        current = dict(unwrap(model).named_parameters())
        pairs = []
        for name, param in self.model.named_parameters():  # every pair checked before any is updated
            source = current.get(name)
            if source is None or source.shape != param.shape:
                problem = "no parameter" if source is None else f"a parameter of shape {tuple(source.shape)} for"
                raise MiraiError(
                    f"the model has {problem} {name!r} (the EMA copy's is {tuple(param.shape)}): pass the model "
                    f"this source was built from"
                )
            pairs.append((param, source))
        for param, source in pairs:
            param.mul_(decay).add_(source.detach().to(param.dtype), alpha=1 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what ``state_dict`` returned; a state that does not fit changes nothing."""
        self.check_state_dict(state)
        self.model.load_state_dict(state, strict=True)

    def check_state_dict(self, state: Any) -> None:
        """Raise unless ``state`` loads (names, shapes, dtypes): what ``load_state_dict`` checks first."""
        problems = state_problems(self.model.state_dict(), state) if isinstance(state, Mapping) else "not a dict"
        if problems:
            raise MiraiError(f"EMA source state does not fit the EMA copy: {problems}; pass what state_dict() returned")


class FrozenImageEncoder:
    """Mirai-I's target: a frozen bidirectional image encoder's patch features on the
    token grid.

    The encoder runs under ``no_grad`` in eval mode. Its patch features ``(b p e)`` are
    laid out on the encoder's own square grid (or ``encoder_grid``) and, when that
    differs from the token grid, resized bilinearly to it; the result is
    ``(b H*W e)`` in raster order.

    The layout is checked against the feature width: ``width``, or the model's
    ``embed_dim`` / ``width`` / ``hidden_size`` (``config.hidden_size``) attribute.
    Features laid out ``(b e p)`` then raise, naming the transpose. Without a known
    width the patch axis is the one whose size can be the patch grid (the token
    grid's count, ``encoder_grid``'s, or a square); when both sizes could be, pass
    ``width=``.

    Args:
        model: the encoder (e.g. DINOv2-B); not modified.
        grid: the AR model's token grid ``(H, W)`` (16x16 for 256 px and a 16x VQ).
        features: ``features(model, images) -> (b p e)`` patch tokens without class or
            register tokens; default ``model(images)``. For DINOv2:
            ``lambda m, x: m.forward_features(x)["x_norm_patchtokens"]``.
        encoder_grid: the encoder's patch grid when it is not square.
        width: the feature width ``e``, to check the layout (default: read from the model).

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
        width: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MiraiError(f"FrozenImageEncoder wraps an nn.Module, got {type(model).__name__}")
        if features is not None and not callable(features):
            raise MiraiError(f"features must be a callable features(model, images), got {type(features).__name__}")
        self.model = model
        self.grid = grid_shape("grid", grid)
        self.encoder_grid = grid_shape("encoder_grid", encoder_grid) if encoder_grid is not None else None
        self.width = check("width", width, Rule("int", minimum=1, none=True)) or _model_width(model)
        self._features = features or (lambda m, x: m(x))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        check_tensor("images", images, layout="(batch, channels, height, width)")
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
        self._check_layout(p, e)
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

    def _check_layout(self, p: int, e: int) -> None:
        transposed = f"the encoder features look laid out (batch, width, patches): got {p} x {e}"
        if self.width is not None:
            if e == self.width:
                return
            if p == self.width:
                raise MiraiError(
                    f"{transposed} and the width is {self.width}; return (batch, patches, width) from features=, "
                    f"e.g. lambda m, x: m(x).transpose(1, 2)"
                )
            raise MiraiError(
                f"the encoder features have width {e}, expected {self.width} (the width given or the model's); "
                f"check features= and width="
            )
        # Without a known width, the patch axis is the one whose size can be the patch count:
        # the token grid's, the encoder grid's, or (no encoder grid given) a square.
        fix = "return (batch, patches, width) from features=, or pass width= (the feature width) when it is right"
        tokens = self.grid[0] * self.grid[1]
        if e == tokens and p != tokens:
            raise MiraiError(f"{transposed} (the last size is the {self.grid[0]}x{self.grid[1]} grid's {tokens} "
                             f"tokens); {fix}")
        if p == tokens:
            return
        if self.encoder_grid is not None:
            count = self.encoder_grid[0] * self.encoder_grid[1]
            if e == count and p != count:
                raise MiraiError(f"{transposed} (the last size is encoder_grid's {count} patches); {fix}")
            return
        square = lambda n: n > 1 and math.isqrt(n) ** 2 == n
        if square(e) and not square(p):
            raise MiraiError(f"{transposed} (only the last size, {e}, is a square patch grid); {fix}")
        if square(e) and square(p):
            raise MiraiError(
                f"the encoder features are {p} x {e}: both sizes are squares, so either could be the patch grid; "
                f"pass width= (the feature width; the model declares none as embed_dim, width or hidden_size)"
            )


def _model_width(model: nn.Module) -> int | None:
    """The feature width a model declares (``embed_dim``, ``width``, ``hidden_size``), if any."""
    for owner in (model, getattr(model, "config", None)):
        for name in ("embed_dim", "width", "hidden_size"):
            value = getattr(owner, name, None)
            if is_int(value) and value >= 1:
                return int(value)
    return None


def grid_shape(name: str, grid: Any) -> tuple[int, int]:
    """``(height, width)`` of a grid: two ints >= 1."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
        fail(name, "(height, width): two ints >= 1", grid)
    values = tuple(grid)
    if len(values) != 2 or not all(is_int(v) and v >= 1 for v in values):
        fail(name, "(height, width): two ints >= 1", grid)
    return int(values[0]), int(values[1])
