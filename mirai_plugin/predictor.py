"""Predictors that map a student segment's hidden states toward the encoder's view.

Legend: B rows (batch x segments), n tokens of one segment, d student width,
h heads, a head width (docs/design.md has the legend).

All predictors keep the student width; ``ForesightHead`` adds the bias-free
projection to the encoder width. A predictor sees one segment per row, so
attention never crosses segments, and rows can go through it in any grouping.

``saved_bytes(tokens, itemsize)`` is what autograd saves when ``tokens`` tokens go
through a predictor whose parameters have ``itemsize`` bytes per element; counted
tensor by tensor from the forward, exact on the CPU kernels (tests/test_memory.py).
The head sizes its groups of segments with it, and mirai_plugin.tooling.memory reports it.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError

_FREQ_DIM = 256  # sinusoidal features of the offset embedding
_FLOAT32 = 4  # bytes: statistics that norms and attention keep in float32 whatever the input dtype


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in float32 (as Wan's q/k norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class OffsetEmbedder(nn.Module):
    """Offset d -> conditioning vector: sinusoidal features (period max_offset + 1), then an MLP."""

    def __init__(self, dim: int, max_offset: int) -> None:
        super().__init__()
        self.max_period = max_offset + 1
        self.fc1 = nn.Linear(_FREQ_DIM, dim)
        self.fc2 = nn.Linear(dim, dim)
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, offset: int, *, dtype: torch.dtype) -> Tensor:
        half = _FREQ_DIM // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=self.fc1.weight.device) / half
        )
        angles = float(offset) * freqs
        features = torch.cat([torch.cos(angles), torch.sin(angles)])[None].to(dtype)  # (1 256)
        return self.fc2(F.silu(self.fc1(features)))  # (1 d)


class DiTBlock(nn.Module):
    """Self-attention + FFN, each with AdaLN scale/shift/gate.

    With conditioning the modulation is a linear map of SiLU(cond); without, it is a
    learned vector (what the official projector computes from its zero conditioning
    vector, since SiLU(0) = 0 leaves only the bias). Either way it starts at zero, so
    every gate is 0 and the block starts as the identity.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, conditioned: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        if conditioned:
            self.modulation = nn.Linear(dim, 6 * dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)
        else:
            self.modulation_bias = nn.Parameter(torch.zeros(6 * dim))

        for linear in (self.to_q, self.to_k, self.to_v, self.to_out, self.ffn_in, self.ffn_out):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        mod = self.modulation_bias if cond is None else self.modulation(F.silu(cond))  # (6d) or (1 6d)
        # Chunk order (scale, shift, gate) x (attention, FFN) follows the official projector,
        # so its AdaLN weights load unchanged.
        scale1, shift1, gate1, scale2, shift2, gate2 = mod.reshape(-1, 1, mod.shape[-1]).chunk(6, dim=-1)  # (1 1 d)

        h = self.norm1(x) * (1 + scale1) + shift1  # (B n d)
        q = rearrange(self.norm_q(self.to_q(h)), "B n (h a) -> B h n a", h=self.num_heads)
        k = rearrange(self.norm_k(self.to_k(h)), "B n (h a) -> B h n a", h=self.num_heads)
        v = rearrange(self.to_v(h), "B n (h a) -> B h n a", h=self.num_heads)
        attn = rearrange(F.scaled_dot_product_attention(q, k, v), "B h n a -> B n (h a)")
        x = x + gate1 * self.to_out(attn)

        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.ffn_out(F.gelu(self.ffn_in(h)))


class DiTPredictor(nn.Module):
    """A stack of ``DiTBlock``s, optionally conditioned on the target offset (DiT-AdaLN)."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        ffn_dim: int,
        offset_conditioning: bool = False,
        max_offset: int = 1,
    ) -> None:
        super().__init__()
        self.offset_embedder = OffsetEmbedder(dim, max_offset) if offset_conditioning else None
        self.blocks = nn.ModuleList(
            DiTBlock(dim, num_heads, ffn_dim, conditioned=offset_conditioning) for _ in range(depth)
        )

    def forward(self, x: Tensor, offset: int | None = None, *, checkpoint_blocks: bool = False) -> Tensor:
        """``checkpoint_blocks`` keeps only each block's input for backward and recomputes
        the block there: one block's activations alive at a time, one more block forward."""
        cond = None
        if self.offset_embedder is not None:
            if offset is None:
                raise TypeError("this predictor is offset-conditioned: pass the target offset")
            cond = self.offset_embedder(offset, dtype=x.dtype)  # (1 d)
        recompute = checkpoint_blocks and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, cond, use_reentrant=False) if recompute else block(x, cond)
        return x

    def block_saved_bytes(self, tokens: int, itemsize: int) -> int:
        """What one block saves for backward over ``tokens`` tokens."""
        block = cast(DiTBlock, self.blocks[0])
        d, ffn, heads = block.to_q.in_features, block.ffn_in.out_features, block.num_heads
        per_token = (
            # block input, norm1 output, modulated attention input, q and k normalised and after the
            # RMSNorm weight (4), v, attention output, to_out output, residual, norm2 output,
            # modulated FFN input, ffn_out output: 14 width-d tensors
            14 * d * itemsize
            + 2 * ffn * itemsize  # FFN hidden before and after GELU
            + 2 * d * _FLOAT32  # to_q / to_k outputs, kept in float32 by RMSNorm
            + 4 * itemsize  # LayerNorm mean and rstd, two norms
            + 2 * _FLOAT32  # RMSNorm rsqrt, q and k
            + heads * _FLOAT32  # attention log-sum-exp
        )
        return tokens * per_token + 2 * d * itemsize  # (1 + scale) of the two modulations

    def saved_bytes(self, tokens: int, itemsize: int, *, checkpoint_blocks: bool = False) -> int:
        """What autograd holds for backward: every block's activations, or with
        ``checkpoint_blocks`` each block's input plus the one block being recomputed."""
        one = self.block_saved_bytes(tokens, itemsize)
        if not checkpoint_blocks:
            return len(self.blocks) * one
        return len(self.blocks) * tokens * cast(DiTBlock, self.blocks[0]).to_q.in_features * itemsize + one


class MLP(nn.Module):
    """Two-layer GELU MLP at the student width."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, offset: int | None = None, *, checkpoint_blocks: bool = False) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def saved_bytes(self, tokens: int, itemsize: int, *, checkpoint_blocks: bool = False) -> int:
        """Input, hidden and GELU(hidden) (there are no blocks to checkpoint)."""
        return tokens * (self.fc1.in_features + 2 * self.fc1.out_features) * itemsize


class MultiMLP(nn.Module):
    """One independent ``MLP`` per target offset."""

    def __init__(self, dim: int, ffn_dim: int, offsets: tuple[int, ...]) -> None:
        super().__init__()
        self.offsets = offsets
        self.heads = nn.ModuleList(MLP(dim, ffn_dim) for _ in offsets)

    def forward(self, x: Tensor, offset: int | None = None, *, checkpoint_blocks: bool = False) -> Tensor:
        if offset not in self.offsets:
            raise TypeError(f"offset {offset!r} has no head; heads exist for offsets {self.offsets}")
        return cast(MLP, self.heads[self.offsets.index(offset)])(x)

    def saved_bytes(self, tokens: int, itemsize: int, *, checkpoint_blocks: bool = False) -> int:
        """One offset's MLP (one runs per pass)."""
        return cast(MLP, self.heads[0]).saved_bytes(tokens, itemsize)


def build_predictor(config: ForesightConfig, width: int) -> DiTPredictor | MLP | MultiMLP:
    """The predictor ``config`` names, at the student's ``width``."""
    ffn_dim = max(1, int(round(width * config.ffn_ratio)))
    if config.predictor == "mlp":
        return MLP(width, ffn_dim)
    if config.predictor == "multi_mlp":
        return MultiMLP(width, ffn_dim, config.offsets)
    num_heads = config.num_heads or max(1, width // 128)
    if width % num_heads:
        raise MiraiError(
            f"student width {width} is not divisible by num_heads={num_heads}; "
            f"set ForesightConfig(num_heads=...) to a divisor (the generator's own head count)"
        )
    return DiTPredictor(width, depth=config.predictor_depth, num_heads=num_heads, ffn_dim=ffn_dim,
                        offset_conditioning=config.offset_conditioning, max_offset=config.max_offset)
