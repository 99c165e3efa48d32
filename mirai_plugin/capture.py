"""Capturing the generator's mid-depth hidden states with a forward hook.

Legend (docs/design.md): b batch, u tokens of one call, d student width.

The hook is registered on entry of ``capture_hidden`` and removed in ``finally``;
the model, its ``forward`` and its ``state_dict`` are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mirai_plugin.blocks import BlockList, block_at
from mirai_plugin.checks import is_int, show
from mirai_plugin.errors import MiraiError


@dataclass(frozen=True)
class HiddenRecord:
    """One captured block output.

    Attributes:
        hidden: ``(b u d)`` block output, still attached to the generator's graph.
        position: token offset of the call's first token (the ``current_start``
            keyword a KV-cache rollout passes to its blocks), or ``None`` when the
            block did not receive one.
        call_index: order of this call among the kept calls of the capture.
    """

    hidden: Tensor
    position: int | None
    call_index: int
    version: int  # hidden._version at capture: detects in-place edits afterwards


class CapturedHidden:
    """The records of one ``capture_hidden`` context, in video order.

    Records are keyed by ``position`` (or by call order when the block gets no
    position): a second grad-enabled call at the same position replaces the first.
    ``ForesightHead`` clears the records once it has read them.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        self._records: dict[int | tuple[str, int], HiddenRecord] = {}
        self._calls = 0
        self.skipped_no_grad = 0

    def _add(self, hidden: Tensor, position: int | None) -> None:
        key: int | tuple[str, int] = position if position is not None else ("call", self._calls)
        self._records[key] = HiddenRecord(hidden, position, self._calls, hidden._version)
        self._calls += 1

    @property
    def records(self) -> list[HiddenRecord]:
        return sorted(self._records.values(), key=lambda r: (r.position is None, r.position or 0, r.call_index))

    def clear(self) -> None:
        """Drop every record (and with it the references that keep the graph alive)."""
        self._records.clear()
        self._calls = 0
        self.skipped_no_grad = 0

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[HiddenRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> HiddenRecord:
        return self.records[index]

    def __repr__(self) -> str:
        return f"CapturedHidden({self.location}, {len(self)} records)"


def _in_backward() -> bool:
    # Activation checkpointing re-runs blocks while autograd executes a graph task;
    # those calls are recomputations, not new segments.
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def capture_hidden(
    model: nn.Module,
    layer: int,
    *,
    blocks: str | BlockList | None = None,
    grad_only: bool = True,
    select: Callable[[Tensor], Tensor] | None = None,
    clone: bool = False,
) -> Iterator[CapturedHidden]:
    """Record the output of ``blocks[layer]`` for every call made inside the context.

    Args:
        model: the generator, bare or wrapped (DDP, FSDP1/2, torch.compile, PEFT,
            Self-Forcing's ``WanDiffusionWrapper``, diffusers).
        layer: 0-based block index.
        blocks: name the block list when it is not a ``.blocks`` attribute
            (dotted path, or the ``ModuleList`` / ``Sequential`` itself).
        grad_only: keep only calls made with grad enabled (in a Self-Forcing rollout,
            the one exit step per segment); calls during a backward recomputation are
            always skipped.
        select: applied to the block output before it is stored, e.g. to keep the
            noisy half of a teacher-forcing sequence.
        clone: store a copy, for models that edit the block output in place later.

    Yields:
        ``CapturedHidden`` with one ``HiddenRecord`` per kept call.

    Example:
        >>> import torch, torch.nn as nn
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        ...     def forward(self, x):
        ...         for block in self.blocks:
        ...             x = block(x)
        ...         return x
        >>> model = Tiny()
        >>> with capture_hidden(model, layer=1) as captured:
        ...     _ = model(torch.randn(2, 5, 8))
        >>> len(captured), captured[0].hidden.shape, captured[0].hidden.requires_grad
        (1, torch.Size([2, 5, 8]), True)
    """
    block, location = block_at(model, layer, blocks)
    captured = CapturedHidden(location)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if _in_backward():
            return
        if grad_only and not torch.is_grad_enabled():
            captured.skipped_no_grad += 1
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, Tensor):
            raise MiraiError(f"{location} returned {type(hidden).__name__}; capture needs a tensor output")
        if select is not None:
            hidden = select(hidden)
        if clone:
            hidden = hidden.clone()
        captured._add(hidden, _position(kwargs.get("current_start"), location))

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _position(current_start: object, location: str) -> int | None:
    """The call's first token offset from the block's ``current_start`` keyword."""
    if current_start is None:
        return None
    expected = "one token offset (an int >= 0, or a one-element integer tensor) per call"
    if isinstance(current_start, Tensor):
        if current_start.device.type == "meta":
            raise MiraiError(f"current_start passed to {location} is on the meta device; capture needs {expected}")
        values = current_start.flatten()
        same = values.numel() >= 1 and bool((values == values[0]).all())
        if not same or current_start.is_floating_point() or current_start.is_complex() or values.dtype == torch.bool:
            raise MiraiError(
                f"current_start passed to {location} must be {expected}, got a {current_start.dtype} tensor of shape "
                f"{tuple(current_start.shape)} (values {values[:8].tolist()}); videos that start at different "
                f"positions cannot be captured as one call"
            )
        current_start = values[0].item()  # one position shared by every video
    if not is_int(current_start) or current_start < 0:
        raise MiraiError(f"current_start passed to {location} must be {expected}, got {show(current_start)}")
    return int(current_start)
