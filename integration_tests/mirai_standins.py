"""Tiny stand-ins for Mirai-I's VQ tokenizer and DINOv2 encoder, saved as whole modules
for ``--mirai-vq-ckpt`` / ``--mirai-encoder`` (importable by the trainer process)."""

import torch
import torch.nn.functional as F
from torch import nn


class TinyVQConfig:
    def __init__(self, codebook_embed_dim: int) -> None:
        self.codebook_embed_dim = codebook_embed_dim


class TinyVQ(nn.Module):
    """``decode_code(codes, [b, c, h, w]) -> (b 3 16h 16w)`` in [-1, 1], like LlamaGen's VQ-16."""

    def __init__(self, vocab: int = 64, embed: int = 8) -> None:
        super().__init__()
        self.config = TinyVQConfig(embed)
        self.codebook = nn.Embedding(vocab, embed)
        self.to_rgb = nn.Conv2d(embed, 3, 1)

    def decode_code(self, codes, shape, channel_first=True):
        b, c, h, w = shape
        latent = self.codebook(codes).view(b, h, w, c).permute(0, 3, 1, 2)
        return torch.tanh(F.interpolate(self.to_rgb(latent), scale_factor=16, mode="nearest"))


class TinyPatchEncoder(nn.Module):
    """14-px patches at 224 px -> 16x16 patch features of width ``embed_dim``, as DINOv2-B/14."""

    def __init__(self, embed_dim: int = 24) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch = nn.Conv2d(3, embed_dim, 14, stride=14)
        self.mix = nn.TransformerEncoderLayer(embed_dim, 2, 48, dropout=0.0, batch_first=True)

    def forward(self, images):
        return self.mix(self.patch(images).flatten(2).transpose(1, 2))  # (b 256 e), bidirectional
