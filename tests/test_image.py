"""Mirai on a tiny raster-order token AR model: grid targets, EMA and encoder sources,
the per-offset heads, the schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import all_hooks
from torch import nn

from mirai_plugin import MiraiError, capture_hidden
from mirai_plugin.image import (
    EMASource,
    FrozenImageEncoder,
    ImageForesightConfig,
    TokenForesightHead,
    grid_offsets,
    grid_pairs,
)

GRID, VOCAB, CLASSES, WIDTH = (4, 4), 32, 5, 16
N = GRID[0] * GRID[1]


class TinyGPT(nn.Module):
    """LlamaGen's shape: a class token, then image tokens, causal blocks in `layers`."""

    def __init__(self, depth=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.cls_embedding = nn.Embedding(CLASSES, WIDTH)
        self.tok_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(N, WIDTH) * 0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.1, batch_first=True) for _ in range(depth)
        )
        self.output = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx, cond_idx, targets=None):
        h = torch.cat([self.cls_embedding(cond_idx)[:, None], self.tok_embeddings(idx)], dim=1) + self.position
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1])
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        logits = self.output(h)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else None
        return logits, loss


def batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, VOCAB, (b, N), generator=g)
    return codes, torch.randint(0, CLASSES, (b,), generator=g)


def reference_term(cfg, head, hidden, target):
    """The method as loops over grid coordinates."""
    H, W = GRID
    prefix, total = cfg.prefix_tokens, 0.0
    target_prefix = prefix if cfg.source == "ema" else 0
    for k, (dy, dx) in enumerate(cfg.offsets):
        preds, goals = [], []
        if cfg.align_prefix:
            preds += [hidden[:, i] for i in range(prefix)]
            goals += [target[:, i] for i in range(prefix)]
        for t in range(hidden.shape[1] - prefix):
            r, c = divmod(t, W)
            if cfg.border == "drop":
                if c + dx >= W or r + dy >= H:
                    continue
                q = (r + dy) * W + c + dx
            else:
                q = t + dy * W + dx
            if q >= target.shape[1] - target_prefix:
                continue
            preds.append(hidden[:, prefix + t])
            goals.append(target[:, target_prefix + q])
        pred = head.projectors[k](torch.stack(preds, 1))
        cos = F.cosine_similarity(pred, torch.stack(goals, 1), dim=-1)
        total = total + cfg.head_weights[k] * (-cos.mean())
    return total * head.weight


# ---------------------------------------------------------------- the grid


def test_offsets_are_the_nearest_future_grid_neighbours():
    assert grid_offsets(1) == ((0, 0),)
    assert grid_offsets(3) == ((0, 0), (0, 1), (1, 0))  # not (0, 2): that is raster order
    assert grid_offsets(4)[3] == (1, 1)
    for k in range(1, 12):  # sorted by distance, all in the future quadrant, no repeats
        offsets = grid_offsets(k)
        distances = [math.hypot(*o) for o in offsets]
        assert distances == sorted(distances) and len(set(offsets)) == k and all(min(o) >= 0 for o in offsets)
    assert grid_offsets(4, order="raster") == ((0, 0), (0, 1), (0, 2), (0, 3))
    with pytest.raises(MiraiError):
        grid_offsets(0)


def test_borders_wrap_in_raster_mode_and_drop_off_grid_neighbours():
    t, q = grid_pairs((0, 1), GRID, student_tokens=N - 1, target_tokens=N - 1, border="raster")
    assert (3, 4) in zip(t.tolist(), q.tolist())  # end of row 0 -> start of row 1
    t, q = grid_pairs((0, 1), GRID, student_tokens=N - 1, target_tokens=N - 1, border="drop")
    assert all(tt % 4 != 3 for tt in t.tolist()) and (q - t).eq(1).all()
    t, q = grid_pairs((1, 0), GRID, student_tokens=N - 1, target_tokens=N, border="drop")
    assert t.max() == 11 and (q - t).eq(4).all()  # the last row has no lower neighbour
    with pytest.raises(MiraiError, match="grid"):
        grid_pairs((0, 0), (2, 2), student_tokens=5, target_tokens=4)


# ---------------------------------------------------------------- the term


@pytest.mark.parametrize("source", ["ema", "encoder"])
@pytest.mark.parametrize("border", ["raster", "drop"])
def test_term_matches_the_method_written_as_loops(source, border):
    cfg = ImageForesightConfig(source=source, neighbours=3, border=border, projector_dim=24, weight=1.5)
    head = TokenForesightHead(cfg, student_dim=WIDTH, encoder_dim=12, grid=GRID)
    hidden = torch.randn(2, N, WIDTH)  # class token + 15 image tokens
    target = torch.randn(2, N, 12)  # EMA: same layout; encoder: 16 patches
    torch.testing.assert_close(head(hidden, target), reference_term(cfg, head, hidden, target), rtol=1e-5, atol=1e-6)


def test_encoder_source_aligns_each_token_with_its_own_patch():
    cfg = ImageForesightConfig(source="encoder", projector_dim=WIDTH, weight=1.0)
    head = TokenForesightHead(cfg, student_dim=WIDTH, encoder_dim=WIDTH, grid=GRID)
    with torch.no_grad():  # an identity head, so the loss reads the alignment itself
        head.projectors[0] = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(3)))
        for layer in head.projectors[0]:
            layer.weight.copy_(torch.eye(WIDTH)), layer.bias.zero_()
    patches = torch.randn(1, N, WIDTH)
    aligned = torch.randn(1, N, WIDTH)
    aligned[:, 1:] = patches[:, : N - 1] * 3  # the hidden state of token t points at patch t
    assert head(aligned, patches).item() == pytest.approx(-1.0, abs=1e-6)
    off_by_one = torch.randn(1, N, WIDTH)
    off_by_one[:, 1:] = patches[:, 1:] * 3  # token t pointing at patch t + 1
    assert head(off_by_one, patches).item() > -0.5


def test_gradients_reach_blocks_up_to_the_layer_and_the_heads_only():
    model = TinyGPT()
    model.eval()  # no dropout: deterministic comparison
    cfg = ImageForesightConfig(source="ema", student_layer=1, projector_dim=16, weight=1.0)
    source = EMASource(model, cfg.student_layer, blocks="layers")
    head = TokenForesightHead(cfg, WIDTH, WIDTH, GRID)
    codes, labels = batch()
    with capture_hidden(model, cfg.student_layer, blocks="layers") as captured:
        _, _ = model(codes[:, :-1], labels)
    term = head(captured, source(codes[:, :-1], labels))
    term.backward()
    assert all_hooks(model) == 0 and len(captured) == 0
    for i, layer in enumerate(model.layers):
        grads = [p.grad for p in layer.parameters()]
        if i <= 1:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None for g in grads), i
    assert model.output.weight.grad is None
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in source.model.parameters())


# ---------------------------------------------------------------- sources


def test_ema_source_starts_as_the_model_keeps_only_early_blocks_and_updates_exactly():
    model = TinyGPT()
    source = EMASource(model, 1, decay=0.9, blocks="layers")
    assert len(source.model.layers) == 2 and len(model.layers) == 4
    codes, labels = batch()
    hidden = {}
    handle = model.layers[1].register_forward_hook(lambda m, a, o: hidden.setdefault("h", o))
    model.eval()
    with torch.no_grad():
        model(codes[:, :-1], labels)
    handle.remove()
    # (the eval fast path of nn.TransformerEncoderLayer rounds differently per call site)
    torch.testing.assert_close(source(codes[:, :-1], labels), hidden["h"], rtol=1e-5, atol=1e-6)

    before = {k: v.clone() for k, v in source.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    source.update(model)
    for name, param in source.model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(model.named_parameters())[name]
        torch.testing.assert_close(param, expected)
    other = EMASource(TinyGPT(seed=3), 1, blocks="layers")
    other.load_state_dict(source.state_dict())
    torch.testing.assert_close(other(codes[:, :-1], labels), source(codes[:, :-1], labels))
    with pytest.raises(MiraiError, match="out of range"):
        EMASource(model, 9, blocks="layers")


def test_image_encoder_resizes_its_patch_grid_to_the_token_grid():
    class Patches(nn.Module):  # 8x8 patches of width 3: the image itself, pooled
        def forward(self, images):
            return F.avg_pool2d(images, 4).flatten(2).transpose(1, 2)

    images = torch.randn(2, 3, 32, 32)
    same = FrozenImageEncoder(Patches(), grid=(8, 8))(images)
    torch.testing.assert_close(same, F.avg_pool2d(images, 4).flatten(2).transpose(1, 2))
    resized = FrozenImageEncoder(Patches(), grid=(4, 4))(images)
    expected = F.interpolate(F.avg_pool2d(images, 4), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))
    with_cls = FrozenImageEncoder(nn.Sequential(Patches(), nn.ConstantPad1d((0, 0, 1, 0), 0.0)), grid=(4, 4))
    with pytest.raises(MiraiError, match="square"):
        with_cls(images)


# ------------------------------------------------------- schedule and errors


def test_mirai_recipe_schedule_and_warm_up():
    cfg = ImageForesightConfig.mirai("ema", total_steps=10, weight_start=2, projector_dim=8)
    head = TokenForesightHead(cfg, WIDTH, WIDTH, GRID)
    weights = []
    for _ in range(10):
        weights.append(head.weight)
        term = head(torch.randn(1, N, WIDTH, requires_grad=True), torch.randn(1, N, WIDTH))
        if head.active:
            term.backward()
        head.step()
    assert weights == [0.0, 0.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    state = head.training_state()
    again = TokenForesightHead(cfg, WIDTH, WIDTH, GRID)
    again.load_training_state(state)
    assert again.steps_taken == 10 and all(torch.equal(a, b) for a, b in zip(head.parameters(), again.parameters()))


def test_errors_name_the_fix():
    with pytest.raises(MiraiError, match="source"):
        ImageForesightConfig(source="dino")
    with pytest.raises(MiraiError, match="head_weights"):
        ImageForesightConfig(neighbours=3, head_weights=(1.0,))
    head = TokenForesightHead(ImageForesightConfig(projector_dim=8), WIDTH, WIDTH, GRID)
    with pytest.raises(MiraiError, match="target must be"):
        head(torch.randn(1, N, WIDTH), torch.randn(1, N, 7))
    with pytest.raises(MiraiError, match="one captured training forward"):
        head([torch.randn(1, N, WIDTH)] * 2, torch.randn(1, N, WIDTH))
    nan = torch.randn(1, N, WIDTH)
    nan[0, 3] = float("nan")
    with pytest.raises(MiraiError, match="targets"):
        head(torch.randn(1, N, WIDTH), nan)
