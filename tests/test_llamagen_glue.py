"""The LlamaGen glue on a LlamaGen-shaped stand-in: what the patch lines do
(integration_tests/test_llamagen.py runs the real trainer)."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import all_hooks
from torch import nn

from mirai_plugin import MiraiError
from mirai_plugin.integrations.llamagen import LlamaGenMirai, add_mirai_arguments

VOCAB, CLASSES, WIDTH, GRID = 32, 5, 16, 4


class TinyLlamaGen(nn.Module):
    """The attributes and call pattern of LlamaGen's ``Transformer`` the glue relies on."""

    def __init__(self):
        super().__init__()
        self.config = argparse.Namespace(dim=WIDTH)
        self.block_size, self.cls_token_num = GRID * GRID, 1
        self.cls_embedding = nn.Embedding(CLASSES, WIDTH)
        self.tok_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.output = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx, cond_idx, input_pos=None, targets=None):
        h = torch.cat([self.cls_embedding(cond_idx)[:, None], self.tok_embeddings(idx)], dim=1)
        for layer in self.layers:
            h = h + torch.tanh(layer(h)).cumsum(dim=1) / (1 + torch.arange(h.shape[1]))[:, None]  # causal mixing
        logits = self.output(h)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else None
        return logits, loss


def args_for(*argv):
    parser = argparse.ArgumentParser()
    for name, value in dict(epochs=2, lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.05, max_grad_norm=1.0).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    add_mirai_arguments(parser)
    return parser.parse_args(list(argv))


def step(mirai, model, optimizer, seed):
    """One training step, called as the patch calls it."""
    g = torch.Generator().manual_seed(seed)
    codes, labels = torch.randint(0, VOCAB, (2, GRID * GRID), generator=g), torch.randint(0, CLASSES, (2,), generator=g)
    mirai.begin_capture()
    _, loss = model(cond_idx=labels, idx=codes[:, :-1], targets=codes)
    loss = mirai.add_term(loss, labels, codes)
    loss.backward()
    optimizer.step()
    mirai.after_generator_step()
    optimizer.zero_grad()
    return loss.item()


E = ("--mirai", "E", "--mirai-layer", "1", "--mirai-projector-dim", "8")


def test_off_by_default_changes_nothing():
    torch.manual_seed(0)
    model = TinyLlamaGen()
    mirai = LlamaGenMirai(model, args_for(), steps_per_epoch=4, device=0)
    assert not mirai.enabled and not mirai.active and mirai.checkpoint_state() == {}
    loss = torch.tensor(1.0)
    mirai.begin_capture()
    assert all_hooks(model) == 0 and mirai.add_term(loss, None, None) is loss
    with mirai.capturing() as captured:
        assert captured is None and all_hooks(model) == 0
    mirai.after_generator_step()
    mirai.after_critic_step(True)
    assert mirai.log_values() == {}
    mirai.load_checkpoint_state({"foresight": {"head": "ignored"}}, strict=True)  # off: nothing to resume


def test_mirai_e_trains_steps_down_and_round_trips_its_checkpoint():
    torch.manual_seed(0)
    model = TinyLlamaGen()
    mirai = LlamaGenMirai(model, args_for(*E, "--mirai-warmup-steps", "1"), steps_per_epoch=4, device=0)
    assert mirai.config.weight_changes == ((4, 1.0),)  # 2 epochs x 4 steps, stepped down half-way
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights, logged = [], []
    for i in range(6):
        weights.append(mirai.head.weight)
        assert math.isfinite(step(mirai, model, optimizer, i))
        assert all_hooks(model) == 0
        logged.append(mirai.log_values())
    assert weights == [0.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    assert logged[0] == {"foresight_weight": 2.0}  # warm-up step: no term; lambda now
    assert set(logged[1]) == {"foresight_loss", "foresight_weight"} and logged[4]["foresight_weight"] == 1.0
    assert mirai.log_values() == {"foresight_weight": 1.0}  # cleared once read
    # the EMA copy moved towards the model
    ema = mirai.source.model.layers[0].weight
    assert not torch.equal(ema, model.layers[0].weight)

    saved = mirai.checkpoint_state()
    assert list(saved) == ["foresight"] and set(saved["foresight"]) == {"head", "source"}
    other = LlamaGenMirai(TinyLlamaGen(), args_for(*E), steps_per_epoch=4, device=0)
    other.load_checkpoint_state(saved)
    assert other.head.steps_taken == 6
    assert torch.equal(other.source.model.layers[0].weight, ema)


def test_checkpoints_written_before_0_2_resume_from_their_mirai_entry():
    torch.manual_seed(0)
    model = TinyLlamaGen()
    mirai = LlamaGenMirai(model, args_for(*E), steps_per_epoch=4, device=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        step(mirai, model, optimizer, i)
    old_checkpoint = {"model": model.state_dict(), "mirai": mirai.checkpoint_state()["foresight"]}  # 0.1's layout
    other = LlamaGenMirai(TinyLlamaGen(), args_for(*E), steps_per_epoch=4, device=0)
    other.load_checkpoint_state(old_checkpoint, strict=True)
    assert other.head.steps_taken == 3
    for a, b in zip(mirai.head.state_dict().values(), other.head.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(other.source.model.layers[0].weight, mirai.source.model.layers[0].weight)
    # saving again writes the new key only
    assert list(other.checkpoint_state()) == ["foresight"]


def test_a_checkpoint_without_an_entry_starts_fresh_unless_strict():
    mirai = LlamaGenMirai(TinyLlamaGen(), args_for(*E), steps_per_epoch=4, device=0)
    mirai.load_checkpoint_state({"model": {}})
    assert mirai.head.steps_taken == 0
    with pytest.raises(MiraiError, match="no 'foresight' entry"):
        mirai.load_checkpoint_state({"model": {}}, strict=True)


def test_the_capture_also_works_as_a_with_block():
    torch.manual_seed(0)
    model = TinyLlamaGen()
    mirai = LlamaGenMirai(model, args_for(*E), steps_per_epoch=4, device=0)
    codes, labels = torch.randint(0, VOCAB, (2, GRID * GRID)), torch.randint(0, CLASSES, (2,))
    with mirai.capturing() as captured:
        assert captured is not None and all_hooks(model) == 1
        _, loss = model(cond_idx=labels, idx=codes[:, :-1], targets=codes)
        total = mirai.add_term(loss, labels, codes)
    assert all_hooks(model) == 0
    assert mirai.log_values()["foresight_loss"] == pytest.approx((total - loss).item(), abs=1e-6)
    with pytest.raises(MiraiError, match="outside the Mirai capture"):
        mirai.add_term(loss, labels, codes)


def test_a_failed_forward_leaves_no_hook_for_the_next_step():
    model = TinyLlamaGen()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mirai = LlamaGenMirai(model, args_for(*E), steps_per_epoch=4, device=0)
    mirai.begin_capture()
    with pytest.raises(IndexError):  # the forward fails: add_term never runs
        model(cond_idx=torch.tensor([99]), idx=torch.zeros(1, 15, dtype=torch.long))
    assert all_hooks(model) == 1
    step(mirai, model, optimizer, 0)  # the next step starts over and ends clean
    assert all_hooks(model) == 0 and mirai.head.steps_taken == 1


def test_fp16_scaled_gradients_are_unscaled_and_overflow_skips_the_step():
    class Scaler:
        def __init__(self, scale):
            self.scale = scale

        def is_enabled(self):
            return True

        def get_scale(self):
            return self.scale

    torch.manual_seed(0)
    model = TinyLlamaGen()
    plain = LlamaGenMirai(model, args_for(*E), steps_per_epoch=4, device=0)
    scaled = LlamaGenMirai(model, args_for(*E), steps_per_epoch=4, device=0)
    scaled.head.load_state_dict(plain.head.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays put: compare the heads only
    g = torch.Generator().manual_seed(0)
    codes, labels = torch.randint(0, VOCAB, (2, 16), generator=g), torch.randint(0, CLASSES, (2,), generator=g)
    for mirai, scale in ((plain, 1.0), (scaled, 1024.0)):
        mirai.scaler = Scaler(scale)
        mirai.begin_capture()
        _, loss = model(cond_idx=labels, idx=codes[:, :-1], targets=codes)
        (mirai.add_term(loss, labels, codes) * scale).backward()
        optimizer.zero_grad()
        mirai.after_generator_step()
    for a, b in zip(plain.head.parameters(), scaled.head.parameters()):
        torch.testing.assert_close(a, b)

    before = [p.clone() for p in scaled.head.parameters()]
    next(scaled.head.parameters()).grad = torch.full_like(before[0], float("inf"))
    steps = scaled.head.steps_taken
    scaled.after_generator_step()
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.head.parameters()))
    assert scaled.head.steps_taken == steps + 1  # the schedule moves on, as the trainer's step count does
    assert all(p.grad is None for p in scaled.head.parameters())


def test_mirai_i_needs_the_tokenizer():
    with pytest.raises(MiraiError, match="--mirai-vq-ckpt"):
        LlamaGenMirai(TinyLlamaGen(), args_for("--mirai", "I"), steps_per_epoch=4, device=0)
