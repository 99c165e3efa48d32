"""Tiny video denoisers for the demo: bidirectional ones (the teacher: the DMD real score and
the frozen foresight encoder; at the student's width: the fake score) and a causal student
that rolls out segment by segment with a KV cache.

Legend: b batch, f frames, s tokens per frame, n tokens of a call, d width,
p = 3*patch*patch pixels of a token.

Noise follows flow matching: ``x_t = (1 - t) * x0 + t * noise`` with ``t`` in [0, 1];
both models predict ``x0``. Pixels are mapped to [-1, 1] inside the models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PATCH = 4


def patchify(video: Tensor) -> Tensor:
    """``(b f 3 h w)`` -> ``(b f*s p)``."""
    return rearrange(video, "b f c (h p) (w q) -> b (f h w) (c p q)", p=PATCH, q=PATCH)


def unpatchify(tokens: Tensor, frames: int, size: int) -> Tensor:
    """``(b f*s p)`` -> ``(b f 3 h w)``."""
    side = size // PATCH
    return rearrange(tokens, "b (f h w) (c p q) -> b f c (h p) (w q)", f=frames, h=side, w=side, p=PATCH, q=PATCH)


def _time_features(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (b dim)


class Block(nn.Module):
    """Pre-norm attention + MLP, conditioned additively on the noise level.

    ``cache`` (causal student only) holds the keys/values of earlier segments;
    ``write`` appends this call's keys/values to it (the context pass).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.cond = nn.Linear(dim, 2 * dim)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        *,
        cache: list | None = None,
        write: bool = False,
        current_start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        modulation = self.cond(cond)
        if modulation.dim() == 2:
            modulation = modulation[:, None]  # one noise level per sample (b 1 2d), else per token (b n 2d)
        shift, scale = modulation.chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = (rearrange(t, "b n (h c) -> b h n c", h=self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        if cache is not None:
            keys = torch.cat([c[0] for c in cache] + [k], dim=2)
            values = torch.cat([c[1] for c in cache] + [v], dim=2)
            if write:
                cache.append((k.detach(), v.detach()))
        else:
            keys, values = k, v
        attention = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.out(rearrange(attention, "b h n c -> b n (h c)"))
        return x + self.mlp(self.norm2(x))


class _Backbone(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, size: int, max_frames: int) -> None:
        super().__init__()
        self.dim, self.size = dim, size
        self.tokens_per_frame = (size // PATCH) ** 2
        self.embed = nn.Linear(3 * PATCH * PATCH, dim)
        self.spatial = nn.Parameter(torch.randn(self.tokens_per_frame, dim))
        self.temporal = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3 * PATCH * PATCH)

    def embed_tokens(self, video: Tensor, t: Tensor, first_frame: int) -> tuple[Tensor, Tensor]:
        frames = video.shape[1]
        x = self.embed(patchify(video * 2 - 1))  # (b n d)
        position = self.temporal[first_frame : first_frame + frames, None] + self.spatial[None]  # (f s d)
        x = x + position.reshape(-1, self.dim)
        return x, self.time(_time_features(t, self.dim))

    def predict(self, x: Tensor, frames: int) -> Tensor:
        return (unpatchify(self.head(self.norm(x)), frames, self.size) + 1) / 2  # x0 in [0, 1]


class Teacher(_Backbone):
    """Bidirectional denoiser over a whole clip (full attention).

    ``t`` is one noise level per video ``(b)`` or per frame ``(b f)``: the DMD scores see
    the given first segment clean (``t = 0`` on its frames) and the generated ones noisy,
    as an image-conditioned video model sees its conditioning frame.
    """

    def forward(self, video: Tensor, t: Tensor) -> Tensor:
        b, frames = video.shape[:2]
        per_frame = t if t.dim() == 2 else t[:, None].expand(b, frames)  # (b f)
        x, _ = self.embed_tokens(video, per_frame[:, 0], 0)
        cond = self.time(_time_features(per_frame.flatten(), self.dim)).view(b, frames, 1, self.dim)
        cond = cond.expand(-1, -1, self.tokens_per_frame, -1).reshape(b, -1, self.dim)  # (b f*s d)
        for block in self.blocks:
            x = block(x, cond)
        return self.predict(x, frames)


class Student(_Backbone):
    """Causal denoiser: one segment per call, attending to the cached earlier segments.

    Like image-conditioned video models, each call also sees the last frame before
    its segment (channel-concatenated to every frame's tokens): copying what is
    already there is then local, and attention to the cache carries the rest.
    """

    def __init__(self, dim: int, depth: int, heads: int, size: int, segment_frames: int, window: int) -> None:
        super().__init__(dim, depth, heads, size, max_frames=(window + 1) * segment_frames)
        self.segment_frames, self.window = segment_frames, window
        self.embed_previous = nn.Linear(3 * PATCH * PATCH, dim)

    def new_cache(self) -> list[list]:
        return [[] for _ in self.blocks]

    def _embed(self, segment: Tensor, previous: Tensor, t: Tensor, slot: int) -> tuple[Tensor, Tensor]:
        x, cond = self.embed_tokens(segment, t, slot * self.segment_frames)
        frames = previous[:, None].expand(-1, segment.shape[1], -1, -1, -1)
        return x + self.embed_previous(patchify(frames * 2 - 1)), cond

    def forward(
        self,
        segment: Tensor,
        t: Tensor,
        cache: list[list],
        slot: int,
        *,
        previous: Tensor,
        position: int | None = None,
        write: bool = False,
    ) -> Tensor:
        """Denoise one segment placed at window ``slot`` after the cached segments.

        ``previous`` is the frame before the segment ``(b 3 h w)`` (zeros for the first).
        ``position`` is the segment's index in the video (default ``slot``); blocks receive
        its token offset as ``current_start``. ``write`` (the context pass on a clean
        segment) appends this segment's keys and values to the cache.
        """
        x, cond = self._embed(segment, previous, t, slot)
        start = (slot if position is None else position) * segment.shape[1] * self.tokens_per_frame
        for block, block_cache in zip(self.blocks, cache):
            window = list(block_cache)
            x = block(x, cond, cache=window, write=write, current_start=start)
            if write:
                block_cache.append(window[-1])
        return self.predict(x, segment.shape[1])

    def teacher_forcing(self, clean: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
        """All segments at once, with gradients through the context: noisy segment k attends to
        clean segments < k and to itself; clean segments attend causally. ``t`` is ``(b K)``."""
        n, frames = self.segment_frames, clean.shape[1]
        segments = frames // n
        tokens = n * self.tokens_per_frame
        previous = torch.cat([torch.zeros_like(clean[:, :1]), clean[:, n - 1 : -1 : n]], dim=1)  # (b K 3 h w)
        previous = previous.repeat_interleave(n, dim=1)  # the frame before each frame's segment
        zero = torch.zeros_like(t[:, 0])
        lift = self.embed_previous(patchify(previous * 2 - 1))
        x_clean = self.embed_tokens(clean, zero, 0)[0] + lift
        x_noisy = self.embed_tokens(noisy, zero, 0)[0] + lift
        x = torch.cat([x_clean, x_noisy], dim=1)  # (b 2*f*s d)
        levels = torch.cat([zero[:, None], t], dim=1)  # clean tokens at t = 0, noisy segment k at t[:, k]
        conds = self.time(_time_features(levels.flatten(), self.dim)).view(t.shape[0], segments + 1, self.dim)
        per_token = torch.cat(
            [conds[:, :1].expand(-1, frames * self.tokens_per_frame, -1), conds[:, 1:].repeat_interleave(tokens, dim=1)],
            dim=1,
        )
        seg = torch.arange(segments, device=clean.device).repeat_interleave(tokens)
        clean_token = torch.cat([torch.ones_like(seg), torch.zeros_like(seg)]).bool()
        sq, sk = torch.cat([seg, seg])[:, None], torch.cat([seg, seg])[None, :]
        mask = torch.where(
            clean_token[:, None],
            clean_token[None, :] & (sk <= sq),
            (clean_token[None, :] & (sk < sq)) | (~clean_token[None, :] & (sk == sq)),
        )
        for block in self.blocks:
            x = block(x, per_token, mask=mask)
        return self.predict(x[:, frames * self.tokens_per_frame :], frames)
