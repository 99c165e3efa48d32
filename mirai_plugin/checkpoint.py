"""A head's checkpoints: the full training state (weights, optimizer, schedule position, RNG)
under every data-parallel strategy, and its weights as a safetensors file.

Weights and optimizer state are gathered full (unsharded, on the CPU) whatever the
strategy, so a state written under FSDP loads into a replicated head and back. Both the
video and the image head go through ``gather_state`` / ``restore_state``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mirai_plugin.checks import Rule, check, check_device_available, parse_device
from mirai_plugin.collectives import gather_messages, world
from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import read_safetensors, state_problems
from mirai_plugin.optimizer import HeadOptimizer
from mirai_plugin.replay import rng_problems
from mirai_plugin.schedule import check_field_names
from mirai_plugin.version import __version__

TRAINING_STATE_FORMAT = "mirai_plugin.ForesightHead.training_state"
FILE_FORMAT = "mirai_plugin.ForesightHead"
# Settings that decide the head's parameters (and what they compute).
ARCHITECTURE = ("predictor", "predictor_depth", "ffn_ratio", "offset_conditioning")
Head = TypeVar("Head", bound=nn.Module)


def gather_state(optimization: HeadOptimizer) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(weights, optimizer state or None)``, full and on the CPU.

    With a process group this is a collective; rank 0 always receives the tensors.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    module = optimization.state_module
    # Offloading gathers to rank 0's CPU; for a head already on the CPU, FSDP1's offload
    # frees the storage it is reading from, so CPU heads gather in place on every rank.
    on_accelerator = next(module.parameters()).device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=world()[1] > 1 and on_accelerator)
    weights = to_cpu(get_model_state_dict(module, options=options))
    # An optimizer that has not stepped has no state; reading it through
    # get_optimizer_state_dict would take a zero step and change its step count.
    optimizer = None
    if optimization.stepped:
        optimizer = to_cpu(get_optimizer_state_dict(module, optimization.optimizer, options=options))
    return weights, optimizer


def restore_state(optimization: HeadOptimizer, weights: Mapping[str, Any],
                  optimizer_state: Mapping[str, Any] | None, *, what: str = "state", target: str = "this head",
                  fix: str = "") -> None:
    """Load what ``gather_state`` returned (rank 0's copy is broadcast to the others), all or
    nothing: rank 0's weights and optimizer state are checked (``check_state``) before either
    loads, and when they are refused every rank raises.

    An optimizer state keyed by parameter index (``optimizer.state_dict()``, as image-head
    states before 0.2.0 hold) loads as it is.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    check_everywhere(lambda: check_state(optimization, weights, optimizer_state, what=what, target=target, fix=fix),
                     rank0_decides=True)
    module = optimization.state_module
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world()[1] > 1)
    # The loaders write sharded tensors back into the dicts they are given: hand them copies.
    set_model_state_dict(module, copy_containers(weights), options=options)
    if optimizer_state is None:
        return
    groups = optimizer_state.get("param_groups", [])  # ranks other than 0 may hold a placeholder
    legacy = bool(groups) and all(isinstance(key, int) for group in groups for key in group["params"])
    if legacy:
        optimization.optimizer.load_state_dict(copy_containers(optimizer_state))
    else:
        set_optimizer_state_dict(module, optimization.optimizer, copy_containers(optimizer_state), options=options)


def check_state(optimization: HeadOptimizer, weights: Any, optimizer_state: Any, *, what: str = "state",
                target: str = "this head", fix: str = "") -> None:
    """Raise unless ``weights`` and ``optimizer_state`` (or ``None``) load into the head and its
    optimizer: names, shapes and dtypes of the weights, the optimizer state's groups and entries.
    The message reads "{what} does not fit {target}: ...{fix}" (``fix`` only for the weights)."""
    if not isinstance(weights, Mapping):
        raise MiraiError(f"{what} weights must be a state dict (name -> tensor), got {type(weights).__name__}{fix}")
    problems = state_problems(optimization.layout, weights)
    if problems:
        raise MiraiError(f"{what} does not fit {target}: {problems}{fix}")
    if optimizer_state is not None:
        problems = optimization.state_problems(optimizer_state)
        if problems:
            raise MiraiError(
                f"{what}'s optimizer state does not fit {target}'s optimizer: {problems}; pass the optimizer "
                f"state saved with these weights (training_state()['optimizer'])"
            )


def check_everywhere(check: Callable[[], None], *, rank0_decides: bool) -> None:
    """Run ``check`` (on rank 0 alone with ``rank0_decides``); when it raises on a rank, raise on
    every rank, so no rank loads while another refuses (or waits for it in a collective)."""
    rank, world_size = world()
    error = None
    if rank == 0 or not rank0_decides:
        try:
            check()
        except MiraiError as caught:
            error = caught
    messages = gather_messages(None if error is None else str(error)) if world_size > 1 else []
    if error is not None:
        raise error
    refused = [(r, message) for r, message in enumerate(messages) if message is not None]
    if refused:
        r, message = refused[0]
        raise MiraiError(f"rank {r} refused the state, so no rank loaded it: {message}")


def broadcast_header(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's small integers on every rank (the others may hold a placeholder)."""
    header = torch.tensor(values, dtype=torch.int64, device=device)
    if world()[1] > 1:
        dist.broadcast(header, src=0)
    return header.tolist()


def head_training_state(head: Any) -> dict[str, Any]:
    """``ForesightHead.training_state()``: weights, optimizer, schedule position, every rank's replay RNG."""
    weights, optimizer_state = gather_state(head.optimization)
    return {
        "format": TRAINING_STATE_FORMAT,
        "head": weights,
        "optimizer": optimizer_state,
        "steps_taken": head.steps_taken,
        "replay_rng": head.replay_cache.rng_states(next(head.parameters()).device),
        "config": head.config.to_dict(),
        "student_dim": head.student_dim,
        "encoder_dim": head.encoder_dim,
    }


def load_head_training_state(head: Any, state: Mapping[str, Any]) -> None:
    """``ForesightHead.load_training_state``: rank 0's state, all checked before anything loads."""
    rank = world()[0]
    device = next(head.parameters()).device
    check_everywhere(lambda: check_training_state(head, state), rank0_decides=True)  # a bad state changes nothing
    # Rank 0 decides; the others follow (they may hold an empty dict).
    header = [int(state.get("optimizer") is not None), int(state.get("steps_taken", 0))] if rank == 0 else [0, 0]
    has_optimizer, steps_taken = broadcast_header(header, device)
    restore_state(head.optimization, state.get("head", {}), state.get("optimizer", {}) if has_optimizer else None,
                  what="training state")  # checks the weights and optimizer state again before it loads them
    head.steps_taken = steps_taken
    head.replay_cache.load_rng_states(state.get("replay_rng") if rank == 0 else None, device)
    head.replay_cache.clear()


def check_training_state(head: Any, state: Any) -> None:
    """``state`` is a training state of a ``ForesightHead`` like ``head``: its settings, weights,
    optimizer state, schedule position and replay RNG (checked before anything loads)."""
    if not isinstance(state, Mapping) or state.get("format") != TRAINING_STATE_FORMAT:
        got = type(state).__name__ if not isinstance(state, Mapping) else f"a dict with keys {sorted(state)[:6]}"
        raise MiraiError(
            f"not a head training state (got {got}): pass what ForesightHead.training_state() returned "
            f"(from a file: torch.load(path, weights_only=True))"
        )
    widths = (state.get("student_dim"), state.get("encoder_dim"))
    if widths != (head.student_dim, head.encoder_dim):
        raise MiraiError(
            f"training state is for widths {widths[0]}->{widths[1]}, this head is {head.student_dim}->"
            f"{head.encoder_dim}; build the head with the widths the state was saved with"
        )
    if not isinstance(state.get("head"), Mapping):
        raise MiraiError(f"training state has no 'head' weights (keys {sorted(state)}); it is incomplete")
    check("training state steps_taken", state.get("steps_taken", 0), Rule("int", minimum=0))
    if state.get("config") is not None and not isinstance(state["config"], Mapping):
        raise MiraiError(f"training state config must be a dict (ForesightConfig.to_dict()), got "
                         f"{type(state['config']).__name__}")
    if isinstance(state.get("config"), Mapping):
        check_field_names(ForesightConfig, state["config"], "training state config")
        saved = ForesightConfig(**state["config"])
        names = list(ARCHITECTURE)
        if saved.predictor == "multi_mlp" or saved.offset_conditioning:
            names.append("offsets")  # one MLP per offset, or the offset embedder's size
        mine, theirs = head.config, saved
        resolved = [("num_heads", _heads(head, mine), _heads(head, theirs))] if mine.predictor == "dit" else []
        differ = [(n, getattr(mine, n), getattr(theirs, n)) for n in names] + resolved
        differ = [(n, a, b) for n, a, b in differ if a != b]
        if differ:
            raise MiraiError(
                "training state is for a different head: "
                + ", ".join(f"{n}={b!r} (this head: {a!r})" for n, a, b in differ)
                + "; build the head with the saved settings: ForesightConfig(**state['config'])"
            )
    check_state(head.optimization, state["head"], state.get("optimizer"), what="training state")
    problem = rng_problems(state.get("replay_rng"))
    if problem:
        raise MiraiError(f"training state replay_rng {problem}: pass what training_state() returned")


def _heads(head: Any, config: ForesightConfig) -> int:
    return config.num_heads or max(1, head.student_dim // 128)


# ------------------------------------------------------------------ safetensors


def save_weights(module: nn.Module, path: str | os.PathLike, *, config: ForesightConfig, student_dim: int,
                 encoder_dim: int) -> None:
    """The head's weights and settings as a ``.safetensors`` file."""
    from safetensors.torch import save_file

    if not isinstance(path, (str, os.PathLike)):
        raise MiraiError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    metadata = {"format": FILE_FORMAT, "version": __version__, "config": config.to_json(),
                "student_dim": str(student_dim), "encoder_dim": str(encoder_dim)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_weights(cls: type[Head], path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Head:
    """``cls(config, student_dim, encoder_dim)`` with the weights of a file ``save_weights`` wrote."""
    target = parse_device("device", device)
    check_device_available("device", target)
    tensors, config, student_dim, encoder_dim = read_weights(path)
    with torch.device("meta"):  # names and shapes only: a refused file leaves the random state alone
        layout = cls(config, student_dim, encoder_dim).state_dict()  # type: ignore[call-arg]
    problems = state_problems(layout, tensors)
    if problems:
        raise MiraiError(f"{os.fspath(path)} does not fit the head its metadata describes: {problems}")
    head = cls(config, student_dim, encoder_dim)  # type: ignore[call-arg]
    head.load_state_dict(tensors, strict=True)
    return head.to(target)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], ForesightConfig, int, int]:
    """``(tensors, config, student_dim, encoder_dim)`` of a file ``save_weights`` wrote."""
    tensors, meta = read_safetensors(path, what="ForesightHead.load:")  # one error naming the file
    name = os.fspath(path)
    if "config" not in meta:
        raise MiraiError(f"{name} was not written by ForesightHead.save (no config in its metadata)")
    try:
        config = ForesightConfig.from_json(meta["config"])
        student_dim, encoder_dim = int(meta["student_dim"]), int(meta["encoder_dim"])
    except (MiraiError, KeyError, ValueError) as error:
        raise MiraiError(f"{name}: its metadata is not what ForesightHead.save writes ({error})") from None
    return tensors, config, student_dim, encoder_dim


# ------------------------------------------------------------------ helpers


def to_cpu(value: Any) -> Any:
    """Plain CPU tensors all the way down (FSDP2 may hand back DTensors)."""
    if isinstance(value, Tensor):
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def copy_containers(value: Any) -> Any:
    """New dicts and lists, the same tensors."""
    if isinstance(value, Mapping):
        return {k: copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_containers(v) for v in value]
    return value
