"""capture_hidden: what is recorded, what is skipped, and that the model is left as it was."""

import pytest
import torch
from conftest import all_hooks
from tiny_models import TOKENS_PER_FRAME, make_inputs, make_pair, rollout

from mirai_plugin import MiraiError, capture_hidden
from mirai_plugin.blocks import find_blocks

LAYER = 2


def run(generator, seed=0, **kwargs):
    noise, cond = make_inputs(seed)
    torch.manual_seed(seed)
    return rollout(generator, noise, cond, **kwargs)


def test_one_record_per_segment_equal_to_explicit_hidden():
    generator, _ = make_pair()
    with capture_hidden(generator, LAYER) as captured:
        _video, explicit = run(generator, hidden_layer=LAYER)
    assert len(captured) == len(explicit) == 3
    for k, (record, expected) in enumerate(zip(captured, explicit)):
        assert torch.equal(record.hidden, expected)
        assert record.hidden.requires_grad and record.hidden.grad_fn is not None
        assert record.position == k * 3 * TOKENS_PER_FRAME
    # 4 steps with exit at index 2 -> 2 no-grad calls + 1 context call per segment were skipped
    assert captured.skipped_no_grad == 3 * 3


def test_capture_does_not_change_outputs_hooks_or_state_dict():
    generator, _ = make_pair()
    keys = list(generator.state_dict())
    baseline, _ = run(generator)
    with capture_hidden(generator, LAYER):
        captured_run, _ = run(generator)
    assert torch.equal(baseline, captured_run)
    assert all_hooks(generator) == 0
    assert list(generator.state_dict()) == keys


def test_hooks_removed_when_the_rollout_raises():
    generator, _ = make_pair()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_hidden(generator, LAYER):
            run(generator)
            raise RuntimeError("boom")
    assert all_hooks(generator) == 0


def test_nested_contexts_remove_only_their_own_hooks():
    generator, _ = make_pair()
    with capture_hidden(generator, 1) as outer:
        with capture_hidden(generator, LAYER) as inner:
            run(generator)
        assert all_hooks(generator) == 1
        run(generator, seed=1)
    assert all_hooks(generator) == 0
    assert len(inner) == 3 and len(outer) == 3  # outer: keyed by position, second rollout overwrote


def test_backward_recomputation_is_not_captured():
    generator, _ = make_pair(checkpointing=True)
    fired = []
    block = generator.model.blocks[LAYER]
    counter = block.register_forward_hook(lambda *a: fired.append(torch.is_grad_enabled()))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with capture_hidden(generator, LAYER) as captured:
            video, _ = run(generator)
            before = [r.hidden for r in captured]
            video.square().mean().backward()
    counter.remove()
    grad_calls = sum(fired)
    assert grad_calls == 6  # 3 forward exit calls + 3 recomputations in backward
    assert len(captured) == 3
    assert all(a is b for a, b in zip(before, [r.hidden for r in captured]))


def test_grad_only_false_keeps_every_call_keyed_by_position():
    generator, _ = make_pair()
    outputs = []  # every output of the block, in call order, seen from outside the capture
    block = generator.model.blocks[LAYER]
    recorder = block.register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone()))
    with capture_hidden(generator, LAYER, grad_only=False) as captured:
        run(generator)
    recorder.remove()
    # every call of a segment shares its position: the last call (the context pass) wins
    assert len(captured) == 3 and len(outputs) % 3 == 0
    assert not any(r.hidden.requires_grad for r in captured)
    calls = len(outputs) // 3  # a segment's calls run one after another
    for k, record in enumerate(captured):
        assert torch.equal(record.hidden, outputs[(k + 1) * calls - 1])
        # control: the segment's other calls (its denoising steps) hold other values
        assert not any(torch.equal(record.hidden, other) for other in outputs[k * calls : (k + 1) * calls - 1])


def test_select_and_clone():
    generator, _ = make_pair()
    with capture_hidden(generator, LAYER, select=lambda h: h[:, :4], clone=True) as captured:
        _, explicit = run(generator, hidden_layer=LAYER)
    assert all(torch.equal(r.hidden, e[:, :4]) for r, e in zip(captured, explicit))


def test_layer_out_of_range_names_the_range_and_location():
    generator, _ = make_pair()
    with pytest.raises(MiraiError, match=r"layer 4 out of range: TinyWrapper.model.blocks has 4 blocks \(0..3\)"):
        with capture_hidden(generator, 4):
            pass


def test_no_block_list_lists_the_module_lists_seen():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(MiraiError, match=r"no block list found.*layers \(1\).*blocks='<dotted.path>'"):
        find_blocks(model)
    found, path = find_blocks(model, "layers")
    assert found is model.layers and path == "Sequential.layers"


class _LoraModel(torch.nn.Module):  # the attribute layout of peft.LoraModel
    def __init__(self, model):
        super().__init__()
        self.model = model


class _PeftModel(torch.nn.Module):  # the attribute layout of peft.PeftModel
    def __init__(self, model):
        super().__init__()
        self.base_model = _LoraModel(model)


def test_finds_blocks_through_wrappers():
    generator, _ = make_pair()
    blocks = generator.model.blocks
    assert find_blocks(generator)[0] is blocks
    assert find_blocks(_PeftModel(generator.model)) == (blocks, "_PeftModel.base_model.model.blocks")
    compiled = torch.compile(generator.model)
    assert find_blocks(compiled) == (blocks, "OptimizedModule._orig_mod.blocks")


def test_capture_under_ddp(process_group):
    generator, _ = make_pair()
    ddp = torch.nn.parallel.DistributedDataParallel(generator)
    with capture_hidden(ddp, LAYER) as captured:
        _, explicit = run(ddp, hidden_layer=LAYER)
    assert captured.location == "DistributedDataParallel.module.model.blocks[2]"
    assert all(torch.equal(r.hidden, e) for r, e in zip(captured, explicit))


def test_capture_under_fsdp1_sees_full_activations(process_group):
    from tiny_models import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    generator, _ = make_pair()
    reference, _ = make_pair()
    fsdp = FSDP(generator, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}))
    with capture_hidden(fsdp, LAYER) as captured:
        run(fsdp)
    _, explicit = run(reference, hidden_layer=LAYER)
    assert "_fsdp_wrapped_module" in captured.location
    assert len(captured) == 3
    assert all(torch.allclose(r.hidden, e, atol=1e-6) for r, e in zip(captured, explicit))
    assert captured[0].hidden.shape[-1] == 32


def test_capture_under_fsdp2(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    generator, _ = make_pair()
    reference, _ = make_pair()
    mesh = init_device_mesh("cpu", (1,))
    for block in generator.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(generator, mesh=mesh)
    with capture_hidden(generator, LAYER) as captured:
        run(generator)
    _, explicit = run(reference, hidden_layer=LAYER)
    assert len(captured) == 3
    assert all(torch.allclose(r.hidden, e, atol=1e-6) for r, e in zip(captured, explicit))
