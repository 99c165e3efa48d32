"""Multi-process cases for tests/test_distributed.py (gloo on CPU, 2 ranks).

Every rank builds the same tiny generator, encoder and head (same seeds), computes
the single-process reference on the global batch with unwrapped copies, then runs
its half of the batch under the strategy being tested and compares. Assertion
errors on any rank fail the test with that rank's traceback.

Legend: B global batch, b per-rank batch.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from tiny_models import make_inputs, make_pair, rollout
from torch import nn

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden
from mirai_plugin.distributed import shard_head

SEGMENT_FRAMES, FRAMES, GLOBAL_BATCH = 3, 9, 2
CONFIG = ForesightConfig(
    student_layer=1, encoder_layer=3, num_heads=2, predictor_depth=1, segment_frames=SEGMENT_FRAMES,
    lr=1e-2, max_grad_norm=1e9, replay_device=None,
)  # fmt: skip


def spawn(case: Callable, *args, world_size: int = 2, timeout: float = 180.0) -> None:
    """Run ``case(rank, world_size, init_file, *args)`` on ``world_size`` processes; re-raise failures."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg")
        context = mp.start_processes(
            _entry, args=(world_size, init_file, case, args), nprocs=world_size, join=False, start_method="spawn"
        )
        import time

        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{case.__name__} did not finish in {timeout} s (a rank is stuck in a collective)")


def _entry(rank: int, world_size: int, init_file: str, case: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    case(rank, world_size, *args)
    dist.barrier()
    dist.destroy_process_group()
    # A background thread left by the CPU collectives can abort the interpreter's own
    # teardown ("terminate called without an active exception"); the case has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ helpers


def _models(seed: int = 0, config: ForesightConfig = CONFIG):
    generator, encoder = make_pair(seed)
    head = ForesightHead(config, 32, 48)
    return generator, encoder, head


def _generator_step(generator, encoder, head, noise, cond, *, cache_dtype=None):
    """One generator step: rollout under capture, base loss + foresight term, backward."""
    with capture_hidden(generator, CONFIG.student_layer) as captured:
        video, _ = rollout(generator, noise, cond, segment_frames=SEGMENT_FRAMES, exit_index=0, cache_dtype=cache_dtype)
    term = head(captured, FrozenEncoder(encoder, CONFIG.encoder_layer)(video.detach(), cond))
    (video.float().pow(2).mean() + term).backward()
    return term.detach()


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # No cpu_offload: on CPU, FSDP1's offload frees the storage it reads (the head avoids it too).
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _assert_close(name: str, actual, expected, tol: float) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), (name, sorted(actual), sorted(expected))
        for key in expected:
            _assert_close(f"{name}.{key}", actual[key], expected[key], tol)
        return
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * max(1.0, scale), f"{name}: max abs error {err:.3e} > {tol:g} (scale {scale:.3e})"


def _wrap_generator(generator: nn.Module, kind: str, mixed: bool) -> nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(generator)
    if kind == "fsdp":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        return FullyShardedDataParallel(
            generator,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=2000),
            mixed_precision=MixedPrecision(torch.bfloat16, torch.float32, torch.float32) if mixed else None,
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in generator.model.blocks:
            fully_shard(block)
        fully_shard(generator)
        return generator
    raise ValueError(kind)


def _head_wrap_kwargs(strategy: str, mixed: bool) -> dict:
    if strategy == "fsdp":
        import functools

        from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        return dict(
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=2000),
            mixed_precision=MixedPrecision(torch.bfloat16, torch.float32, torch.float32) if mixed else None,
            device_id=torch.device("cpu"),
        )
    return {}


def _updates(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert after.keys() == before.keys(), (sorted(after), sorted(before))
    return {key: after[key].float() - before[key].float() for key in before}


def _relative(actual, expected) -> float:
    """``|actual - expected| / |expected|`` (L2 over every tensor of a dict)."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    actual, expected = _vector(actual), _vector(expected)
    return ((actual - expected).norm() / expected.norm()).item()


def _vector(value) -> torch.Tensor:
    """A tensor, or a dict of tensors concatenated in key order, as one float32 vector."""
    if isinstance(value, dict):
        value = torch.cat([value[key].flatten() for key in sorted(value)])
    return torch.as_tensor(value).float().flatten()


def _single_process(noise, cond, *, bf16: bool = False) -> dict:
    """One generator step (SGD, lr 1), head step and replay on the global batch in one process, unwrapped.
    Returns the term, the head's gradient norm, the replay loss and the updates (after - before) of the head
    at its step and at the replay and of the generator. ``bf16``: generator and encoder held and run in bfloat16
    and the head computing in bfloat16 over float32 weights (what FSDP's MixedPrecision(param_dtype=bfloat16)
    does, without the sharding); the updates still apply to float32 weights."""
    generator, encoder, head = _models(config=CONFIG.replace(compute_dtype="bfloat16") if bf16 else CONFIG)
    head_start, generator_start = copy.deepcopy(head.state_dict()), copy.deepcopy(generator.state_dict())
    run_generator, run_encoder = generator, encoder
    if bf16:
        run_generator, run_encoder = copy.deepcopy(generator).bfloat16(), copy.deepcopy(encoder).bfloat16()
        noise, cond = noise.bfloat16(), {"prompt_embeds": cond["prompt_embeds"].bfloat16()}
    term = _generator_step(run_generator, run_encoder, head, noise, cond, cache_dtype=torch.bfloat16 if bf16 else None)
    for weight, computed in zip(generator.parameters(), run_generator.parameters()):
        weight.grad = computed.grad.float()
    torch.optim.SGD(generator.parameters(), lr=1.0).step()
    norm = head.step()
    head_after_step = copy.deepcopy(head.state_dict())
    replay = head.replay()
    return {
        "term": term, "head gradient norm": norm, "replay loss": replay.detach(),
        "head step": _updates(head_after_step, head_start),
        "generator step": _updates(generator.state_dict(), generator_start),
        "head replay step": _updates(head.state_dict(), head_after_step),
    }  # fmt: skip


# -------------------------------------------------------------------- cases


def equivalence(rank: int, world_size: int, generator_kind: str, head_strategy: str, mixed: bool,
                budget: float | None = None) -> None:
    """Loss, head gradient norm, head and generator updates, replay and training state
    under the strategy equal the single-process run on the global batch (one pass), in float32
    within float32's summation order, in mixed precision within twice bfloat16's effect on each. With a
    ``budget`` (MiB) the distributed head runs its segments in groups recomputed in the backward."""
    noise, cond = make_inputs(0, batch=GLOBAL_BATCH, frames=FRAMES)
    mine = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)

    # Single-process reference on the global batch in float32 (every rank computes it).
    reference = _single_process(noise, cond)
    zero = [key for key, value in reference.items() if not _vector(value).any()]
    assert not zero, f"zero in the single-process run: {zero}"  # the term is there, every step moved its weights
    if mixed:
        # bfloat16's effect on each value, measured in one process; the two ranks round the same operations
        # on their halves of the batch and differ from float32 by at most 1.4 times as much: twice the effect
        # (relative: 2.6e-2 on the term, 1e-1 on the head's Adam step, 1e-2 on the generator's).
        bf16 = _single_process(noise, cond, bf16=True)
        tolerance = {key: 2 * _relative(bf16[key], reference[key]) for key in reference}
        # control: inputs moved by 10 % fall outside every tolerance (by 2.9 times or more)
        moved = noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
        for key, value in _single_process(moved, cond).items():
            assert _relative(value, reference[key]) > tolerance[key], (key, tolerance[key])
    else:  # float32 summation order over two ranks and FSDP's flat buffers (at most 3e-6 here)
        tolerance = dict.fromkeys(reference, 2e-5)
    # A zero term or a step not taken is off by 1.
    assert max(tolerance.values()) < 0.2, tolerance

    # The same models, distributed.
    config = CONFIG.replace(activation_budget_mib=budget) if budget is not None else CONFIG
    generator, encoder, head = _models(config=config)
    head_start, generator_start = copy.deepcopy(head.state_dict()), copy.deepcopy(generator.state_dict())
    generator = _wrap_generator(generator, generator_kind, mixed)
    if generator_kind == "fsdp":  # the trainer FSDP-wraps the real score too; the encoder runs it as it is
        encoder = _wrap_generator(encoder, "fsdp", mixed)
    shard_head(head, head_strategy, **_head_wrap_kwargs(head_strategy, mixed))
    opt = torch.optim.SGD(generator.parameters(), lr=1.0)
    cond_mine = {"prompt_embeds": cond["prompt_embeds"][mine]}
    term = _generator_step(
        generator, encoder, head, noise[mine], cond_mine, cache_dtype=torch.bfloat16 if mixed else None
    )
    opt.step()
    norm = head.step()
    head_after_step = head.training_state()["head"]  # full on rank 0
    generator_after_step = _full_state(generator)
    replayed = head.replay()
    state = head.training_state()
    measured = {
        "term": _mean_over_ranks(term), "head gradient norm": norm, "replay loss": _mean_over_ranks(replayed)
    }  # fmt: skip
    if rank == 0:
        measured["head step"] = _updates(head_after_step, head_start)
        measured["generator step"] = _updates(generator_after_step, generator_start)
        measured["head replay step"] = _updates(state["head"], head_after_step)
        assert state["steps_taken"] == 1 and state["optimizer"] is not None
    for key, value in measured.items():
        error = _relative(value, reference[key])
        assert error <= tolerance[key], f"{key}: relative error {error:.2e} > {tolerance[key]:.2e}"
    if mixed:  # computed in bfloat16
        assert _relative(measured["term"], reference["term"]) > 0

    # Round trip: a fresh head under the same strategy resumes the state exactly (rank 0's dict only).
    _, _, fresh = _models(seed=1, config=config)
    shard_head(fresh, head_strategy, **_head_wrap_kwargs(head_strategy, mixed))
    fresh.load_training_state(state if rank == 0 else {})
    assert fresh.steps_taken == 1
    again = fresh.training_state()
    if rank == 0:
        _assert_close("reloaded head", again["head"], state["head"], 0.0)
        _assert_close("reloaded optimizer", again["optimizer"]["state"], state["optimizer"]["state"], 0.0)


def nonfinite_on_one_rank(rank: int, world_size: int) -> None:
    """A NaN target on rank 1, segment 2: every rank raises, naming rank 1 and the segments; none hangs."""
    generator, encoder, head = _models()
    noise, cond = make_inputs(rank, batch=1, frames=FRAMES)
    with capture_hidden(generator, CONFIG.student_layer) as captured:
        video, _ = rollout(generator, noise, cond, segment_frames=SEGMENT_FRAMES, exit_index=0)
    z = FrozenEncoder(encoder, CONFIG.encoder_layer)(video.detach(), cond)
    if rank == 1:
        z[:, 2 * SEGMENT_FRAMES * 4] = float("nan")  # first token of segment 2
    try:
        head(captured, z)
    except MiraiError as error:
        message = str(error)
        # segment 2's target is NaN, and segment 1's through offset 1
        assert "rank 1: encoder targets" in message and "segments [1, 2]" in message, message
        assert "rank 0:" not in message, message
    else:
        raise AssertionError(f"rank {rank}: no error for a NaN target on rank 1")
    dist.barrier()  # reached by both ranks: nobody is stuck


def refused_state(rank: int, world_size: int, strategy: str) -> None:
    """Rank 0's state holds another head's optimizer state: every rank raises, none hangs, no rank's
    head changes; then the right state loads on every rank."""
    generator, encoder, head = _models()
    shard_head(head, strategy, **_head_wrap_kwargs(strategy, False))
    noise, cond = make_inputs(0, batch=1, frames=FRAMES)
    _generator_step(generator, encoder, head, noise, cond)
    head.step()
    state = head.training_state()
    _, _, other = _models(seed=2, config=CONFIG.replace(predictor_depth=2))
    _generator_step(generator, encoder, other, noise, cond)
    other.step()
    foreign = other.training_state()["optimizer"]

    _, _, fresh = _models(seed=1)
    shard_head(fresh, strategy, **_head_wrap_kwargs(strategy, False))
    _generator_step(generator, encoder, fresh, noise, cond)
    fresh.step()
    before = fresh.training_state()
    refused = {**state, "optimizer": foreign} if rank == 0 else {}
    try:
        fresh.load_training_state(refused)
    except MiraiError as error:
        assert "optimizer state does not fit" in str(error) or "rank 0 refused" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: rank 0's refused state loaded")
    after = fresh.training_state()
    if rank == 0:
        _assert_close("head after a refused load", after["head"], before["head"], 0.0)
        _assert_close("optimizer after a refused load", after["optimizer"]["state"], before["optimizer"]["state"], 0.0)
        assert after["steps_taken"] == before["steps_taken"] and torch.equal(after["replay_rng"], before["replay_rng"])
    fresh.load_training_state(state if rank == 0 else {})
    again = fresh.training_state()
    if rank == 0:
        _assert_close("reloaded head", again["head"], state["head"], 0.0)
        _assert_close("reloaded optimizer", again["optimizer"]["state"], state["optimizer"]["state"], 0.0)


def uneven_replay(rank: int, world_size: int) -> None:
    """Rank 1 has nothing cached: replicated replay still synchronises (mean over all pairs)."""
    generator, encoder, head = _models()
    noise, cond = make_inputs(0, batch=1, frames=FRAMES)
    ref = ForesightHead(CONFIG, 32, 48)
    ref.load_state_dict(head.state_dict())
    _generator_step(generator, encoder, ref, noise, cond)
    ref.optimizer.zero_grad()
    ref_loss = ref.replay()
    head.train(rank == 0)  # rank 1 computes the term in eval mode: nothing cached there
    _generator_step(generator, encoder, head, noise, cond)
    head.optimizer.zero_grad()
    loss = head.replay()
    assert (loss is None) == (rank == 1)
    # Rank 0's pairs are all the pairs: the mean gradient is rank 0's alone, as in one process.
    _assert_close("replayed head", head.state_dict(), ref.state_dict(), 2e-6)
    if rank == 0:
        _assert_close("replay loss", loss, ref_loss, 1e-6)


def replay_before_step(rank: int, world_size: int) -> None:
    """head.replay() before head.step() where only rank 0 has gradients waiting: every rank raises (none is
    left in a collective) and keeps its cache; after head.step() the replay runs on every rank."""
    generator, encoder, head = _models()
    noise, cond = make_inputs(rank, batch=1, frames=FRAMES)
    _generator_step(generator, encoder, head, noise, cond)
    if rank == 1:
        head.zero_grad(set_to_none=True)
    try:
        head.replay()
    except MiraiError as error:
        assert "would discard the head's gradients" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: no error for replay() before step()")
    assert head.replay_pairs == 3
    head.step()
    assert head.replay() is not None


def encoder_gathers_once(rank: int, world_size: int) -> None:
    """Under FSDP1 (one unit per block), an early-exit encoder call all-gathers blocks 0..l
    once each and nothing after block l, and leaves them resharded; the root unit behaves
    as after any FSDP1 forward (gathered on the first call, kept unsharded)."""
    import functools

    from tiny_models import Block
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParamHandle
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    _, encoder, _ = _models()
    encoder = FullyShardedDataParallel(
        encoder, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu")
    )
    units = [m for m in encoder.modules() if isinstance(m, FullyShardedDataParallel) and m is not encoder]
    root_handle = encoder._handle
    gathered = []
    original = FlatParamHandle._all_gather_flat_param

    @functools.wraps(original)
    def counting(self, *args, **kwargs):
        gathered.append("root" if self is root_handle else units.index(next(u for u in units if u._handle is self)))
        return original(self, *args, **kwargs)

    noise, cond = make_inputs(0, batch=1, frames=FRAMES)
    frozen = FrozenEncoder(encoder, CONFIG.encoder_layer)
    FlatParamHandle._all_gather_flat_param = counting
    try:
        calls = []
        for _ in range(2):
            gathered.clear()
            frozen(noise, cond)
            calls.append(list(gathered))
            for unit in units:  # every block unit is back to its shard
                flat = unit._handle.flat_param
                assert flat.data.data_ptr() == flat._local_shard.data_ptr(), "a block stayed unsharded"
        gathered.clear()
        with torch.no_grad():
            encoder(noise, cond, torch.zeros(1, FRAMES, dtype=torch.int64))
        full = list(gathered)
    finally:
        FlatParamHandle._all_gather_flat_param = original
    blocks_to_layer = list(range(CONFIG.encoder_layer + 1))
    assert calls == [["root", *blocks_to_layer], blocks_to_layer], calls
    assert full == list(range(len(units))), full  # a full forward gathers every block once
