"""The head, capture, encoder and replay under torchrun-style data parallelism:
2 ranks, gloo, CPU. The cases live in distributed_cases.py (run in subprocesses)."""

import distributed_cases as cases
import pytest

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # two processes each: 7-25 s, 90 s in all


@pytest.mark.parametrize(
    "generator_kind, head_strategy, mixed",
    [
        ("ddp", "replicate", False),
        ("ddp", "ddp", False),
        ("fsdp", "fsdp", False),
        ("fsdp", "fsdp", True),
        ("fsdp2", "fsdp2", False),
    ],
)
def test_two_ranks_equal_one_process_on_the_global_batch(generator_kind, head_strategy, mixed):
    cases.spawn(cases.equivalence, generator_kind, head_strategy, mixed)


@pytest.mark.parametrize("head_strategy", ["replicate", "ddp", "fsdp", "fsdp2"])
def test_segments_recomputed_in_the_backward_under_every_strategy(head_strategy):
    """A budget below one segment: groups of one segment with checkpointed predictor blocks,
    recomputed inside the generator's backward through the DDP/FSDP wrapper."""
    generator_kind = {"replicate": "ddp", "ddp": "ddp", "fsdp": "fsdp", "fsdp2": "fsdp2"}[head_strategy]
    cases.spawn(cases.equivalence, generator_kind, head_strategy, False, 1e-6)


def test_nonfinite_term_on_one_rank_is_reported_by_every_rank():
    cases.spawn(cases.nonfinite_on_one_rank)


def test_replay_with_nothing_cached_on_one_rank_stays_synchronised():
    cases.spawn(cases.uneven_replay)


def test_misuse_order_replay_before_step_raises_on_every_rank():
    cases.spawn(cases.replay_before_step)


def test_fsdp_encoder_is_gathered_once_per_unit_up_to_its_layer():
    cases.spawn(cases.encoder_gathers_once)
