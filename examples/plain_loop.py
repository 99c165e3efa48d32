"""A plain training loop with the foresight term added: the three marked lines.

A tiny causal generator emits a token "video" segment by segment; a frozen
bidirectional encoder looks at the whole rollout. Runs on a CPU in seconds:

    python examples/plain_loop.py
"""

import torch
from torch import nn

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, capture_hidden

WIDTH, ENCODER_WIDTH, SEGMENTS, FRAMES_PER_SEGMENT, TOKENS_PER_FRAME = 64, 96, 7, 3, 16
SEGMENT_TOKENS = FRAMES_PER_SEGMENT * TOKENS_PER_FRAME


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context=None, current_start=None):
        h = self.norm(x)
        kv = h if context is None else torch.cat([context, h], dim=1)  # causal: past segments + this one
        x = x + self.attn(h, kv, kv, need_weights=False)[0]
        return x + self.mlp(x)


class Transformer(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None, current_start=None):
        for block in self.blocks:
            x = block(x, context, current_start=current_start)
        return self.out(x)


def generate(generator, noise):
    """Causal rollout: segment k sees segments < k; blocks get the token offset `current_start`."""
    segments = []
    for k in range(SEGMENTS):
        past = torch.cat(segments, dim=1).detach() if segments else None
        chunk = noise[:, k * SEGMENT_TOKENS : (k + 1) * SEGMENT_TOKENS]
        segments.append(generator(chunk, past, current_start=k * SEGMENT_TOKENS))
    return torch.cat(segments, dim=1)  # (b, frames * tokens_per_frame, width)


def main():
    torch.manual_seed(0)
    generator, encoder_model = Transformer(WIDTH, 6), Transformer(ENCODER_WIDTH, 8).requires_grad_(False)
    to_encoder = nn.Linear(WIDTH, ENCODER_WIDTH).requires_grad_(False)  # stands in for "encode the video"
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-3)

    cfg = ForesightConfig(student_layer=3, encoder_layer=4, num_heads=4, segment_frames=FRAMES_PER_SEGMENT)
    head = ForesightHead(cfg, student_dim=WIDTH, encoder_dim=ENCODER_WIDTH)
    encoder = FrozenEncoder(encoder_model, cfg.encoder_layer)

    for step in range(20):
        noise = torch.randn(2, SEGMENTS * SEGMENT_TOKENS, WIDTH)
        with capture_hidden(generator, cfg.student_layer) as captured:  # mirai: 1/3
            video = generate(generator, noise)
        loss = video.square().mean()  # the trainer's own loss (DMD in Self-Forcing)
        foresight = head(captured, encoder(to_encoder(video.detach())))  # mirai: 2/3
        (loss + foresight).backward()
        optimizer.step()
        optimizer.zero_grad()
        head.step()  # mirai: 3/3 (clip, step, zero the head's own AdamW)
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}  foresight {foresight.item():+.4f}")


if __name__ == "__main__":
    main()
