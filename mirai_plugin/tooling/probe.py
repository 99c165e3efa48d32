"""The representation probe: how much of the future a frozen hidden state already holds.

Legend: v videos, k segments, n tokens per segment, d feature width, p target values per token.

A small MLP readout is trained, token by token, to reconstruct the clean segment
``k + h`` from the frozen features of segment ``k`` (token-aligned, as the
foresight target is), for each horizon ``h``; its PSNR on held-out videos says
how much of that future the features encode. Features come from any model via
``capture_hidden`` (see ``docs/demo.md`` for a real-checkpoint example); the
command ``mirai-plugin probe FEATURES.safetensors`` runs this on a file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from mirai_plugin.checks import Rule, check, check_finite_values, check_tensor
from mirai_plugin.errors import MiraiError


def fit_readout(
    features: Tensor, targets: Tensor, *, hidden: int = 256, steps: int = 400, lr: float = 2e-3,
    batch: int = 2048, seed: int = 0,
) -> nn.Module:
    """Train ``MLP(d -> hidden -> p)`` on rows ``features (m d) -> targets (m p)`` with Adam and MSE."""
    for name, value in (("hidden", hidden), ("steps", steps), ("batch", batch)):
        check(name, value, Rule("int", minimum=1))
    check("lr", lr, Rule("number", above=0))
    check("seed", seed, Rule("int", minimum=0))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        readout = nn.Sequential(
            _Standardize(features), nn.Linear(features.shape[1], hidden), nn.GELU(), nn.Linear(hidden, targets.shape[1])
        )
    optimizer = torch.optim.Adam(readout.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(features.shape[0], (min(batch, features.shape[0]),), generator=g)
        loss = (readout(features[rows]) - targets[rows]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return readout.eval()


class _Standardize(nn.Module):
    """Per-channel standardisation with training-set statistics (keeps linear information, unlike LayerNorm)."""

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", features.mean(dim=0))
        self.register_buffer("std", features.std(dim=0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def probe(
    features: Tensor,
    targets: Tensor,
    *,
    horizons: Sequence[int] = (1, 2, 3),
    test_videos: int | None = None,
    peak: float = 1.0,
    **readout_options,
) -> dict[int, dict[str, float]]:
    """PSNR and MSE of a readout from segment ``k`` features to clean segment ``k + h``.

    Args:
        features: ``(v k n d)`` frozen features of every segment.
        targets: ``(v k n p)`` clean content of every segment, token-aligned.
        horizons: segment offsets ``h`` to reconstruct.
        test_videos: the last ``test_videos`` videos are held out (default a quarter).
        peak: the value range of the targets, for PSNR (1 for pixels in [0, 1]).

    Returns:
        ``{h: {"psnr": dB, "mse": value}}`` on the held-out videos.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> feats = torch.randn(40, 5, 8, 6, generator=g)
        >>> targets = torch.zeros(40, 5, 8, 3)
        >>> targets[:, 1:] = feats[:, :-1, :, :3] * 0.1      # segment k+1 is a linear read of segment k
        >>> result = probe(feats, targets, horizons=(1,), steps=300)
        >>> result[1]["psnr"] > 30
        True
    """
    check_tensor("features", features, layout="(videos, segments, tokens, width)")
    check_tensor("targets", targets, layout="(videos, segments, tokens, values)")
    peak = check("peak", peak, Rule("number", above=0, fix="1 for values in [0, 1], 255 for 8-bit pixels"))
    check("test_videos", test_videos, Rule("int", minimum=1, none=True, fix="None holds out a quarter"))
    if isinstance(horizons, (str, bytes)) or not isinstance(horizons, Iterable):
        raise MiraiError(f"horizons must be a sequence of segment offsets >= 1 such as (1, 2, 3), got {horizons!r}")
    horizons = [check("horizons", h, Rule("int", minimum=1, what="segment offsets >= 1")) for h in horizons]
    if not horizons:
        raise MiraiError("horizons is empty: give at least one segment offset, e.g. (1, 2, 3)")
    if features.dim() != 4 or targets.dim() != 4 or features.shape[:3] != targets.shape[:3]:
        raise MiraiError(
            f"features (videos, segments, tokens, width) and targets (videos, segments, tokens, values) must share "
            f"their first three sizes; got {tuple(features.shape)} and {tuple(targets.shape)}"
        )
    for name, values in (("features", features), ("targets", targets)):
        if 0 in values.shape:
            raise MiraiError(f"{name} of shape {tuple(values.shape)} are empty; every size must be >= 1")
        if values.is_complex() or values.dtype == torch.bool:
            raise MiraiError(f"{name} must hold real numbers, got {values.dtype}")
        # One NaN makes the readout's statistics, and so every PSNR, NaN.
        check_finite_values(name, values, dims="(video, segment, token, channel)",
                            fix="drop those videos or fix what produced them")
    v, k = features.shape[:2]
    test = test_videos if test_videos is not None else max(1, v // 4)
    if not 0 < test < v:
        raise MiraiError(f"test_videos={test} must leave videos for training and testing (there are {v})")
    results = {}
    for h in horizons:
        if not 0 < h < k:
            raise MiraiError(f"horizon {h} needs at least {h + 1} segments per video, there are {k}")
        x = features[:, : k - h].float()  # (v k-h n d)
        y = targets[:, h:].float()  # (v k-h n p)
        readout = fit_readout(x[:-test].reshape(-1, x.shape[-1]), y[:-test].reshape(-1, y.shape[-1]), **readout_options)
        with torch.no_grad():
            error = readout(x[-test:].reshape(-1, x.shape[-1])) - y[-test:].reshape(-1, y.shape[-1])
            mse = error.square().mean().item()
        results[h] = {"psnr": 10 * math.log10(peak * peak / max(mse, 1e-12)), "mse": mse}
    return results
