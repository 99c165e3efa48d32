"""The cosine loss against offset-mean targets (fusion ``mean``), without materialising the targets.

Legend: b batch, K segments in the video, k supervised segments, o offsets,
n tokens per segment, e encoder width.

For fusion ``mean`` the target of segment ``k`` is the mean of the encoder's
segments ``k + d`` over the valid offsets. Computed naively, the targets, their
float32 copies and the elementwise products each take the size of all targets.
Here one segment's target exists at a time, in float32, in forward and again in
backward (recomputed from the encoder output, which is alive anyway); the only
full-size allocation is the prediction's gradient. Values equal
``foresight_loss(pred, fuse_targets(...).target, keep_dims=(1,))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-8  # as foresight_loss


_CHUNK = 256  # tokens per step: keeps the float32 temporaries far below one segment


def _chunks(tokens: int) -> list[slice]:
    return [slice(start, min(start + _CHUNK, tokens)) for start in range(0, tokens, _CHUNK)]


def _segment_target(z: Tensor, source: Tensor, valid: Tensor, row: int, tokens: slice) -> Tensor:
    """``(b c e)`` mean of ``z[:, source[row, o], tokens]`` over the valid offsets, in float32, rounded
    once to ``z``'s dtype like ``torch.stack(...).mean(0)`` (so bfloat16 targets match the official)."""
    picks = source[row][valid[row]].tolist()
    if len(picks) == 1:
        return z[:, picks[0], tokens].float()
    target = z[:, picks[0], tokens].float()
    for segment in picks[1:]:
        target = target + z[:, segment, tokens]
    target = target / len(picks)
    return target if z.dtype == torch.float32 else target.to(z.dtype).float()


class _FusedMeanCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: Tensor, z: Tensor, source: Tensor, valid: Tensor) -> Tensor:
        b, k, n, _ = pred.shape
        stats = torch.empty(2, k, b, n, dtype=torch.float32, device=pred.device)  # per token: p.y and |p||y|
        for row in range(k):
            for tokens in _chunks(n):
                y = _segment_target(z, source, valid, row, tokens)  # (b c e) float32
                p = pred[:, row, tokens].float()
                stats[0, row, :, tokens] = (p.unsqueeze(-2) @ y.unsqueeze(-1)).squeeze(-1).squeeze(-1)
                stats[1, row, :, tokens] = torch.linalg.vector_norm(p, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
        ctx.save_for_backward(pred, z, source, valid, stats)
        return -(stats[0] / stats[1].clamp_min(_EPS)).mean(dim=(1, 2))  # (k)

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        pred, z, source, valid, stats = ctx.saved_tensors
        b, k, n, _ = pred.shape
        grad = torch.empty_like(pred)
        for row in range(k):
            scale = -grad_losses[row] / (b * n)
            for tokens in _chunks(n):
                y = _segment_target(z, source, valid, row, tokens)
                p = pred[:, row, tokens].float()
                dot, norms = stats[0, row, :, tokens, None], stats[1, row, :, tokens, None]  # (b c 1)
                denominator = norms.clamp_min(_EPS)
                p_squared = torch.linalg.vector_norm(p, dim=-1, keepdim=True).square().clamp_min(_EPS)
                # d cos / d p = y / (|p||y|) - (p.y) p / (|p|^3 |y|); a clamped denominator leaves y / eps
                radial = torch.where(norms <= _EPS, torch.zeros_like(dot), dot / (denominator * p_squared))
                grad[:, row, tokens] = ((y / denominator - radial * p) * scale).to(pred.dtype)
        return grad, None, None, None


def mean_target_cosine(pred: Tensor, z: Tensor, source: Tensor, valid: Tensor) -> Tensor:
    """Per-segment ``-mean cos(pred_k, mean_{d valid} z[k + d])``: ``(k)`` losses, float32.

    Args:
        pred: ``(b k n e)`` predictions for the supervised segments.
        z: ``(b K n e)`` encoder hidden states split into segments (stop-gradient).
        source: ``(k o)`` index of segment ``k + d`` in ``z``; ``valid``: ``(k o)`` bool.
    """
    return _FusedMeanCosine.apply(pred, z.detach(), source, valid)
