"""The benchmarks' own small models: a bidirectional video transformer and a causal one with a KV cache.

Legend: b batch, f frames, c h w pixels, s tokens per frame, n tokens, d width.

Plain pre-norm transformers over 4x4-pixel patches with a ``blocks`` list, the shape
``capture_hidden`` and ``FrozenEncoder`` look for; nothing is trained. ``rollout`` runs the
causal one as Self-Forcing training does: per segment, few-step denoising without
gradients, one call with gradients, then a context pass that fills the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PATCH = 4


class Block(nn.Module):
    """Pre-norm attention + MLP; with a ``cache`` the keys and values of earlier segments come first."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, *, cache: list | None = None, write: bool = False, current_start: int = 0) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h e) -> three b h n e", three=3, h=self.heads)
        if cache is not None:
            if write:
                cache.append((k.detach(), v.detach()))
            k = torch.cat([past[0] for past in cache[:-1 if write else None]] + [k], dim=2)  # (b h n' e)
            v = torch.cat([past[1] for past in cache[:-1 if write else None]] + [v], dim=2)
        x = x + self.out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)"))
        return x + self.mlp(self.norm2(x))


class VideoTransformer(nn.Module):
    """``(video (b f c h w), t (b)) -> (b f c h w)``; bidirectional over all frames."""

    def __init__(self, dim: int, depth: int, heads: int, size: int, frames: int) -> None:
        super().__init__()
        self.tokens = (size // PATCH) ** 2
        self.embed = nn.Linear(3 * PATCH * PATCH, dim)
        self.position = nn.Parameter(0.02 * torch.randn(frames * self.tokens, dim))
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.unembed = nn.Linear(dim, 3 * PATCH * PATCH)

    def patchify(self, video: Tensor) -> Tensor:
        return rearrange(video, "b f c (y p) (x q) -> b (f y x) (c p q)", p=PATCH, q=PATCH)  # (b n 3pp)

    def unpatchify(self, tokens: Tensor, frames: int) -> Tensor:
        side = int(self.tokens**0.5)
        return rearrange(tokens, "b (f y x) (c p q) -> b f c (y p) (x q)", f=frames, y=side, p=PATCH, q=PATCH)

    def forward(self, video: Tensor, t: Tensor) -> Tensor:
        n = video.shape[1] * self.tokens
        x = self.embed(self.patchify(video)) + self.position[:n] + self.time(t[:, None])[:, None]  # (b n d)
        for block in self.blocks:
            x = block(x)
        return self.unpatchify(self.unembed(x), video.shape[1])


class CausalVideoTransformer(VideoTransformer):
    """One segment at a time: ``(segment (b f c h w), t (b), cache, start) -> (b f c h w)``; each block
    attends to the cached keys and values of earlier segments and gets ``current_start`` (token offset)."""

    def forward(self, segment: Tensor, t: Tensor, cache: list[list], start: int, *, write: bool = False) -> Tensor:
        n = segment.shape[1] * self.tokens
        x = self.embed(self.patchify(segment)) + self.position[start : start + n] + self.time(t[:, None])[:, None]
        for block, past in zip(self.blocks, cache):
            x = block(x, cache=past, write=write, current_start=start)
        return self.unpatchify(self.unembed(x), segment.shape[1])


def rollout(model: CausalVideoTransformer, first: Tensor, segments: int, *, exit_index: int, g: torch.Generator,
            levels: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)) -> Tensor:
    """``first`` (b f c h w) and ``segments`` generated segments after it, concatenated on frames."""
    b, frames = first.shape[:2]
    cache: list[list] = [[] for _ in model.blocks]
    with torch.no_grad():
        model(first, torch.zeros(b), cache, 0, write=True)
    out = [first]
    for k in range(1, segments + 1):
        start = k * frames * model.tokens
        x = torch.randn(first.shape, generator=g)
        for i, level in enumerate(levels):
            t = torch.full((b,), level)
            if i == exit_index:
                x0 = model(x, t, cache, start)  # the call that keeps gradients
                break
            with torch.no_grad():
                x0 = model(x, t, cache, start)
                x = (1 - levels[i + 1]) * x0 + levels[i + 1] * torch.randn(x0.shape, generator=g)
        out.append(x0)
        with torch.no_grad():  # context pass on the output
            model(x0.detach(), torch.zeros(b), cache, start, write=True)
    return torch.cat(out, dim=1)
