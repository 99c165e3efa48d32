"""Tiny token-image models for the image demo: a LlamaGen-shaped raster AR GPT and a
bidirectional masked-token encoder (the frozen Mirai-I target).

Legend: b batch, N = H*W image tokens, T sequence positions, d width, V vocabulary.

LlamaGen's class-to-image layout: the sequence is ``[class, x_0, ..., x_{N-2}]`` and the
logits at position i predict ``x_i``, so position 0 (the class token) predicts the
first image token and no position sees the token it predicts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm self-attention + MLP; ``causal`` picks the attention mask.

    ``cache`` (sampling only): a list holding this block's keys and values of the earlier
    positions; the call's own are appended to it.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, cache: list | None = None) -> Tensor:
        q, k, v = (rearrange(t, "b n (h c) -> b h n c", h=self.heads) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        causal = self.causal
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
                causal = causal and q.shape[2] > 1  # one new token attends to every cached one
            cache[:] = [k, v]
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.out(rearrange(attention, "b h n c -> b n (h c)"))
        return x + self.mlp(self.norm2(x))


class GridPositions(nn.Module):
    """Learned 2D positions: a row and a column embedding per token, summed (factorised as
    LlamaGen's 2D RoPE is), so "same column" and "mirrored column" are shared across rows.
    ``slots`` leading positions (the class token) get their own embeddings."""

    def __init__(self, side: int, dim: int, *, slots: int = 0) -> None:
        super().__init__()
        self.side = side
        self.rows = nn.Parameter(torch.randn(side, dim) * 0.02)
        self.cols = nn.Parameter(torch.randn(side, dim) * 0.02)
        self.slots = nn.Parameter(torch.randn(slots, dim) * 0.02)

    def forward(self, length: int) -> Tensor:
        """``(length d)`` for the first ``length`` positions: the slots, then the grid in raster order."""
        grid = (self.rows[:, None] + self.cols[None]).flatten(0, 1)  # (H*W d)
        return torch.cat([self.slots, grid])[:length]


class TinyGPT(nn.Module):
    """Class-conditional raster AR model in LlamaGen's shape: ``cls_embedding``,
    ``tok_embeddings``, 2D positions, causal blocks in ``layers``, ``norm``, ``output``.

    ``forward(idx, cond_idx)`` takes the image tokens fed as input ``(b n)`` (``n <= N - 1``
    in training: the sequence without its last token) and the class labels ``(b,)``, and
    returns logits ``(b 1+n V)``.
    """

    def __init__(self, *, vocab: int, classes: int, tokens: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.cls_embedding = nn.Embedding(classes, dim)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.position = GridPositions(math.isqrt(tokens), dim, slots=1)  # position 1 + t holds token t
        self.layers = nn.ModuleList(Block(dim, heads, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor, cond_idx: Tensor) -> Tensor:
        h = torch.cat([self.cls_embedding(cond_idx)[:, None], self.tok_embeddings(idx)], dim=1)
        return self._blocks(h + self.position(h.shape[1]))

    def _blocks(self, h: Tensor, caches: list[list] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, None if caches is None else caches[i])
        return self.output(self.norm(h))

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy of flattened images ``(b N)``, mean over tokens."""
        logits = self(images[:, :-1], labels)
        return F.cross_entropy(logits.flatten(0, 1), images.flatten())

    @torch.no_grad()
    def sample(self, labels: Tensor, *, generator: torch.Generator, temperature: float = 1.0) -> Tensor:
        """Raster-order sampling with a KV cache, one token per step: ``(b N)``."""
        caches = [[] for _ in self.layers]
        positions = self.position(self.tokens)  # position 1 + t holds token t; the last token is never an input
        h = self.cls_embedding(labels)[:, None] + positions[:1]
        tokens = []
        for t in range(self.tokens):
            logits = self._blocks(h, caches)[:, -1] / temperature
            tokens.append(torch.multinomial(logits.float().softmax(-1), 1, generator=generator))
            if t + 1 < self.tokens:
                h = self.tok_embeddings(tokens[-1]) + positions[t + 1 : t + 2]
        return torch.cat(tokens, dim=1)


class MaskedTokenEncoder(nn.Module):
    """Bidirectional transformer trained to fill in masked tokens (a tiny BERT/MaskGIT
    encoder). Frozen, its final features on a whole image are Mirai-I's targets: each
    token's feature is computed from the entire image, the future included.
    """

    def __init__(self, *, vocab: int, tokens: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.mask_token = vocab  # one extra embedding row
        self.tok_embeddings = nn.Embedding(vocab + 1, dim)
        self.position = GridPositions(math.isqrt(tokens), dim)
        self.layers = nn.ModuleList(Block(dim, heads, causal=False) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab)

    def features(self, images: Tensor) -> Tensor:
        """``(b N)`` tokens -> ``(b N d)`` normalised final features."""
        h = self.tok_embeddings(images) + self.position(images.shape[1])
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def forward(self, images: Tensor) -> Tensor:
        return self.output(self.features(images))

    def masked_loss(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Cross-entropy on a random 15-85 % of the tokens of each image, replaced by the mask token."""
        ratio = 0.15 + 0.7 * torch.rand(images.shape[0], 1, generator=generator)
        masked = torch.rand(images.shape, generator=generator) < ratio
        logits = self(images.masked_fill(masked, self.mask_token))
        return F.cross_entropy(logits[masked], images[masked])
