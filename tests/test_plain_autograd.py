"""The term behaves as plain autograd on both paths: one pass (no activation budget) and segments
recomputed in the backward (``GroupedLosses``), for every way of asking autograd for gradients.

The expected values come from a reference loop run through plain autograd (the method written out:
predictor, cosine against the mean of the valid offsets' encoder segments, mean, weight) on a copy of the
head, with the same autograd call. What cannot behave so raises ``MiraiError``.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mirai_plugin import ForesightConfig, ForesightHead, MiraiError
from mirai_plugin.distributed import shard_head

D, E, S, SEGMENTS, BATCH = 16, 24, 4, 5, 2  # 5 segments of 1 frame, 4 tokens each
CONFIG = ForesightConfig(num_heads=2, segment_frames=1, predictor_depth=2, replay_device=None)
PATHS = {"one pass": None, "groups of two": "two", "checkpointed blocks": 1e-9}
BOUNDED = settings(derandomize=True, max_examples=6, deadline=None)


def head_for(path):
    """A head with live (random) weights, the same for every path."""
    head = ForesightHead(CONFIG.replace(activation_budget_mib=None), D, E)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    budget = PATHS[path]
    if budget == "two":  # room for two segments' activations
        budget = 2.5 * head.segment_bytes(BATCH, S) / 2**20
    out = ForesightHead(CONFIG.replace(activation_budget_mib=budget), D, E)
    out.load_state_dict(head.state_dict())
    return out


def rollout(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(BATCH, S, D, generator=g).requires_grad_() for _ in range(SEGMENTS)]  # k x (b n d)
    return hidden, torch.randn(BATCH, SEGMENTS * S, E, generator=g)  # (b t e)


def reference_term(head, hidden, z):
    """The method as a loop over segments, through plain autograd."""
    losses = []
    for k, h in enumerate(hidden):
        y = torch.stack([z[:, (k + o) * S : (k + o + 1) * S] for o in CONFIG.offsets if k + o < SEGMENTS]).mean(0)
        p = head.predict(h)  # (b n e)
        losses.append(-F.cosine_similarity(p.flatten(0, 1), y.flatten(0, 1), dim=-1).mean())
    return torch.stack(losses).mean() * head.weight


def ask(kind, term, hidden, params, scale, retain):
    """One autograd call of ``kind``; returns what it returns (gradients for autograd.grad, else None)."""
    gradient = torch.tensor(scale)
    some = [hidden[1], params[0], params[-1]]  # a few of each
    if kind == "backward":
        return term.backward(gradient, retain_graph=retain)
    if kind.startswith("backward inputs="):
        inputs = {"hidden": hidden, "params": params, "some": some}[kind.split("=")[1]]
        return term.backward(gradient, retain_graph=retain, inputs=inputs)
    inputs = {"grad hidden": hidden, "grad params": params, "grad some": some}[kind]
    return torch.autograd.grad(term, inputs, gradient, retain_graph=retain, allow_unused=True)


KINDS = ["backward", "backward inputs=hidden", "backward inputs=params", "backward inputs=some", "grad hidden",
         "grad params", "grad some"]


def run(head, term_of, kind, seed, calls, retain, existing, scale):
    """The term, the call's results and every ``.grad`` afterwards (head parameters by name, hidden states)."""
    hidden, z = rollout(seed)
    names = [name for name, _ in head.named_parameters()]
    params = list(head.parameters())
    if existing:  # gradients already accumulated (a previous micro-step)
        g = torch.Generator().manual_seed(seed + 1)
        for t in (*params, *hidden):
            t.grad = torch.randn(t.shape, generator=g)
    term = term_of(head, hidden, z)
    results = [ask(kind, term, hidden, params, scale, retain) for _ in range(calls)]
    grads = {f"head.{n}": p.grad for n, p in zip(names, params)}
    grads.update({f"hidden.{i}": h.grad for i, h in enumerate(hidden)})
    return term.detach(), results, grads


def assert_close(actual, expected, what):
    """float32, summed in another order and per segment instead of one pass: errors of a few float32 eps
    (1.2e-7) times the terms summed, so 1e-5 relative, with an absolute floor of 1e-6 of the tensor's scale."""
    if expected is None:
        assert actual is None, what
        return
    assert actual is not None, what
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * max(scale, 0.1), msg=what)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@BOUNDED
@given(seed=st.integers(0, 2**16), calls_retain=st.sampled_from([(1, False), (1, True), (2, True)]),
       existing=st.booleans(), scale=st.sampled_from([1.0, 0.5, 2.0**12]))
def test_every_autograd_call_gives_what_plain_autograd_gives(kind, path, seed, calls_retain, existing, scale):
    """Results and side effects on the head's and the hidden states' .grad, as plain autograd gives them."""
    calls, retain = calls_retain
    reference = head_for("one pass")
    head = head_for(path)
    expected = run(reference, reference_term, kind, seed, calls, retain, existing, scale)
    actual = run(head, lambda h, hidden, z: h(hidden, z), kind, seed, calls, retain, existing, scale)
    assert_close(actual[0], expected[0], "term")
    for i, (got, want) in enumerate(zip(actual[1], expected[1])):
        assert (got is None) == (want is None)
        for j, (a, b) in enumerate(zip(got or (), want or ())):
            assert_close(a, b, f"call {i}, gradient {j}")
    assert actual[2].keys() == expected[2].keys()
    for key in expected[2]:
        assert_close(actual[2][key], expected[2][key], key)


def test_the_head_parameters_gradients_are_returned_not_accumulated():
    """The issue's case: autograd.grad with respect to the hidden states leaves the head alone."""
    head = head_for("checkpointed blocks")
    hidden, z = rollout(0)
    torch.autograd.grad(head(hidden, z), hidden)
    assert all(p.grad is None for p in head.parameters())
    assert all(h.grad is None for h in hidden)


@pytest.mark.parametrize("path", PATHS)
def test_accumulation_adds_into_the_existing_grad_tensors(path):
    """As one pass does: a second micro-step adds into the .grad tensors already there, no new copy of them
    (storages compared by address: a reference held here would make autograd copy)."""
    head = head_for(path)
    hidden, z = rollout(0)
    head(hidden, z).backward()
    addresses = [p.grad.data_ptr() for p in head.parameters()]
    hidden, z = rollout(1)
    head(hidden, z).backward()
    assert [p.grad.data_ptr() for p in head.parameters()] == addresses


def test_a_double_backward_needs_the_one_pass_path():
    """create_graph=True through recomputed segments cannot build the second-order graph: an error, not zeros."""
    hidden, z = rollout(0)
    (grad,) = torch.autograd.grad(head_for("one pass")(hidden, z), hidden[0], create_graph=True)
    assert grad.requires_grad  # one pass: a gradient penalty works
    with pytest.raises(MiraiError, match="create_graph=True.*activation_budget_mib=None"):
        torch.autograd.grad(head_for("groups of two")(hidden, z), hidden[0], create_graph=True)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_a_sharded_head_on_the_budget_path_behaves_as_one_pass(strategy, process_group):
    """FSDP accumulates the head's gradients in its own hooks: autograd.grad and backward(inputs=...) with
    respect to the hidden states leave the head alone, a full backward() gives the one-pass gradients."""
    reference = head_for("one pass")
    hidden, z = rollout(0)
    expected_hidden = torch.autograd.grad(reference_term(reference, hidden, z), hidden)
    reference_term(reference, hidden, z).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}

    head = head_for("checkpointed blocks")
    names = [n for n, _ in head.named_parameters()]
    wrapper = shard_head(head, strategy, **({"device_id": torch.device("cpu")} if strategy == "fsdp" else {}))
    hidden, z = rollout(0)
    for i, got in enumerate(torch.autograd.grad(head(hidden, z), hidden)):
        assert_close(got, expected_hidden[i], f"hidden {i}")
    head(hidden, z).backward(inputs=hidden)
    for i, h in enumerate(hidden):
        assert_close(h.grad, expected_hidden[i], f"hidden {i}")
    assert all(p.grad is None for p in wrapper.parameters())

    head(hidden, z).backward()
    if strategy == "fsdp":  # one rank: one flat parameter, the parameters' gradients in order
        (flat,) = wrapper.parameters()
        assert_close(flat.grad, torch.cat([expected[n].flatten() for n in names]), "flat parameter")
    else:
        for name, p in zip(names, head.parameters()):
            assert_close(p.grad.full_tensor(), expected[name], name)
