"""The head, capture, encoder and replay under torchrun-style data parallelism:
2 ranks, gloo, CPU. The cases live in distributed_cases.py (run in subprocesses)."""

import pytest

import distributed_cases as cases

pytestmark = pytest.mark.filterwarnings("ignore")


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


def test_nonfinite_term_on_one_rank_is_reported_by_every_rank():
    cases.spawn(cases.nonfinite_on_one_rank)


def test_replay_with_nothing_cached_on_one_rank_stays_synchronised():
    cases.spawn(cases.uneven_replay)


def test_fsdp_encoder_is_gathered_once_per_unit_up_to_its_layer():
    cases.spawn(cases.encoder_gathers_once)
