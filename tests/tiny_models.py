"""Tiny Wan-shaped models for the tests: a causal student with a KV-cache rollout and a
bidirectional encoder, both with Self-Forcing's call convention.

Legend: b batch, f frames, c channels, h/w latent size, s tokens per frame,
n tokens of one call, d width.

The rollout follows the Self-Forcing training pipeline's call pattern: per segment,
no-grad denoising calls, one grad-enabled exit call, then one no-grad context call
that writes the KV cache. The models also offer an explicit
``return_hidden_at_layer`` so tests can compare hook captures against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

CHANNELS, HEIGHT, WIDTH, PATCH = 4, 4, 4, 2
TOKENS_PER_FRAME = (HEIGHT // PATCH) * (WIDTH // PATCH)  # 4
TEXT_DIM = 8


class Block(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.cond = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        *,
        current_start: int | None = None,
        kv_cache: dict | None = None,
        write_cache: bool = False,
    ) -> Tensor:
        h = self.norm1(x) + self.cond(e)[:, None]  # (b n d)
        q, k, v = (rearrange(t, "b n (h c) -> b h n c", h=self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        if kv_cache is not None:
            end = current_start + x.shape[1]
            if write_cache:
                kv_cache["k"][:, :, current_start:end] = k.detach()
                kv_cache["v"][:, :, current_start:end] = v.detach()
            # causal by segment: cached past plus the current segment
            k = torch.cat([kv_cache["k"][:, :, :current_start], k], dim=2)
            v = torch.cat([kv_cache["v"][:, :, :current_start], v], dim=2)
        attn = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n c -> b n (h c)")
        x = x + self.out(attn)
        return x + self.mlp(self.norm2(x))


class TinyWan(nn.Module):
    """Patchify -> blocks -> head; causal (KV cache) or bidirectional."""

    def __init__(self, dim: int = 32, depth: int = 4, *, causal: bool = True, checkpointing: bool = False) -> None:
        super().__init__()
        self.dim, self.causal, self.checkpointing = dim, causal, checkpointing
        self.num_heads = 2
        self.patch_size = (1, PATCH, PATCH)
        self.patch = nn.Linear(CHANNELS * PATCH * PATCH, dim)
        self.time = nn.Linear(16, dim)
        self.text = nn.Linear(TEXT_DIM, dim)
        self.blocks = nn.ModuleList(Block(dim, self.num_heads) for _ in range(depth))
        self.head = nn.Linear(dim, CHANNELS * PATCH * PATCH)

    def new_cache(self, batch: int, tokens: int, dtype: torch.dtype | None = None) -> list[dict]:
        heads = self.num_heads
        shape = (batch, heads, tokens, self.dim // heads)
        dtype = dtype or self.head.weight.dtype
        return [{"k": torch.zeros(shape, dtype=dtype), "v": torch.zeros(shape, dtype=dtype)} for _ in self.blocks]

    def forward(
        self,
        video: Tensor,
        timestep: Tensor,
        context: Tensor,
        *,
        kv_cache: list[dict] | None = None,
        current_start: int = 0,
        write_cache: bool = False,
        return_hidden_at_layer: int | None = None,
    ):
        _b, f = video.shape[:2]
        x = rearrange(video, "b f c (h p) (w q) -> b (f h w) (c p q)", p=PATCH, q=PATCH)
        x = self.patch(x)  # (b n d)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        angles = timestep.float().mean(dim=1, keepdim=True) * freqs  # (b 8)
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.time.weight.dtype)
        e = self.time(features) + self.text(context.mean(dim=1))  # (b d)
        hidden = None
        for i, block in enumerate(self.blocks):
            kwargs = {}
            if self.causal:
                kwargs = dict(current_start=current_start, kv_cache=kv_cache[i], write_cache=write_cache)
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, e, use_reentrant=False, **kwargs)
            else:
                x = block(x, e, **kwargs)
            if i == return_hidden_at_layer:
                hidden = x.clone()
        out = rearrange(
            self.head(x), "b (f h w) (c p q) -> b f c (h p) (w q)", f=f, h=HEIGHT // PATCH, p=PATCH, q=PATCH
        )
        return (out, hidden) if return_hidden_at_layer is not None else out


class TinyWrapper(nn.Module):
    """Self-Forcing ``WanDiffusionWrapper`` call convention around a ``TinyWan``."""

    def __init__(self, model: TinyWan) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        noisy_image_or_video: Tensor,
        conditional_dict: dict,
        timestep: Tensor,
        kv_cache: list[dict] | None = None,
        current_start: int | None = None,
        write_cache: bool = False,
        return_hidden_at_layer: int | None = None,
    ):
        out = self.model(
            noisy_image_or_video,
            timestep,
            conditional_dict["prompt_embeds"],
            kv_cache=kv_cache,
            current_start=current_start or 0,
            write_cache=write_cache,
            return_hidden_at_layer=return_hidden_at_layer,
        )
        if return_hidden_at_layer is not None:
            flow, hidden = out
            return flow, noisy_image_or_video - flow, hidden
        return out, noisy_image_or_video - out


def rollout(
    generator: nn.Module,
    noise: Tensor,
    conditional_dict: dict,
    *,
    segment_frames: int = 3,
    steps: tuple[int, ...] = (1000, 750, 500, 250),
    exit_index: int = 2,
    hidden_layer: int | None = None,
    cache_dtype: torch.dtype | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Self-Forcing-style training rollout; returns the video and, with ``hidden_layer``,
    the explicit hidden state of each segment's grad-enabled exit call. ``cache_dtype``:
    the compute dtype under mixed precision (default: the weights' dtype)."""
    b, frames = noise.shape[:2]
    s = TOKENS_PER_FRAME
    cache = _model(generator).new_cache(b, frames * s, cache_dtype)
    output = torch.zeros_like(noise)
    hidden_states = []
    for k in range(frames // segment_frames):
        start = k * segment_frames
        x = noise[:, start : start + segment_frames]
        for i, t in enumerate(steps):
            timestep = torch.full((b, segment_frames), t, dtype=torch.int64)
            call = dict(kv_cache=cache, current_start=start * s)
            if i == exit_index:
                if hidden_layer is None:
                    _, x0 = generator(x, conditional_dict, timestep, **call)
                else:
                    _, x0, hidden = generator(
                        x, conditional_dict, timestep, return_hidden_at_layer=hidden_layer, **call
                    )
                    hidden_states.append(hidden)
                break
            with torch.no_grad():
                _, x0 = generator(x, conditional_dict, timestep, **call)
                x = 0.5 * x0 + 0.5 * torch.randn_like(x0)
        output[:, start : start + segment_frames] = x0
        with torch.no_grad():
            zero = torch.zeros((b, segment_frames), dtype=torch.int64)
            generator(x0.detach(), conditional_dict, zero, kv_cache=cache, current_start=start * s, write_cache=True)
    return output, hidden_states


def _model(module: nn.Module) -> TinyWan:
    while not isinstance(module, TinyWan):
        module = getattr(module, "module", None) or getattr(module, "_fsdp_wrapped_module", None) or module.model
    return module


def make_pair(seed: int = 0, *, student_dim: int = 32, encoder_dim: int = 48, checkpointing: bool = False):
    """A (generator wrapper, encoder wrapper) pair with random weights."""
    torch.manual_seed(seed)
    generator = TinyWrapper(TinyWan(student_dim, depth=4, causal=True, checkpointing=checkpointing))
    encoder = TinyWrapper(TinyWan(encoder_dim, depth=6, causal=False))
    encoder.requires_grad_(False)
    return generator, encoder


def make_inputs(seed: int = 0, *, batch: int = 2, frames: int = 9) -> tuple[Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, CHANNELS, HEIGHT, WIDTH, generator=g)
    return noise, {"prompt_embeds": torch.randn(batch, 5, TEXT_DIM, generator=g)}
