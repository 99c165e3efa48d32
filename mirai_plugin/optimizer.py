"""The head's own optimizer: AdamW made on first use, gradient averaging, clipping, and the
data-parallel wrapper it steps through.

A head is replicated by default: every rank keeps a full copy and ``clip_and_step``
averages the gradients first. ``mirai_plugin.distributed.shard_head`` attaches a DDP or
FSDP1 wrapper (or FSDP2, in place) through ``attach``; the optimizer is then made over
the wrapper's parameters and clipping uses the wrapper's global norm. The video and the
image heads both hold one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mirai_plugin.collectives import average_gradients
from mirai_plugin.errors import MiraiError

STRATEGIES = ("replicate", "ddp", "fsdp", "fsdp2")

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class HeadOptimizer:
    """Owns the head's optimizer and its data-parallel wrapper; holds no parameters itself.

    Args:
        module: the head.
        make: builds the optimizer over the parameters it is given.
        max_grad_norm: clip to this norm before each step (``None``: no clipping).
    """

    def __init__(self, module: nn.Module, make: MakeOptimizer, max_grad_norm: float | None) -> None:
        self.module = module
        self.make = make
        self.max_grad_norm = max_grad_norm
        self.strategy = "replicate"
        self._wrapper: tuple[nn.Module, ...] = ()  # a tuple: the wrapper holds the head, not the other way
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def wrapper(self) -> nn.Module | None:
        """The DDP / FSDP1 wrapper the head's calls go through, if any."""
        return self._wrapper[0] if self._wrapper else None

    def attach(self, strategy: str, wrapper: nn.Module | None) -> None:
        """Step through ``wrapper`` under ``strategy`` from now on (``shard_head`` calls this once).

        Refused after the optimizer has stepped: its state belongs to the unwrapped parameters.
        """
        self.check_attachable(strategy)
        self.strategy = strategy
        self._wrapper = (wrapper,) if wrapper is not None else ()
        self._optimizer = None

    def check_attachable(self, strategy: str) -> None:
        """Raise unless ``attach(strategy, ...)`` may be called (checked before anything is wrapped)."""
        if strategy not in STRATEGIES:
            raise MiraiError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if self.strategy != "replicate" or self.wrapper is not None:
            raise MiraiError(f"the head is already under {self.strategy!r}; call shard_head once")
        if self.stepped:
            raise MiraiError(
                "the head's optimizer has already stepped: shard the head right after building it "
                "(or after load, before the first step) so its optimizer is built over the sharded parameters"
            )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer, made on first use over the parameters of the head (or of its wrapper)."""
        if self._optimizer is None:
            self._optimizer = self.make(self.parameters())
        return self._optimizer

    @property
    def stepped(self) -> bool:
        """Whether the optimizer holds state (it has stepped, or a state was loaded)."""
        return self._optimizer is not None and bool(self._optimizer.state)

    @property
    def state_module(self) -> nn.Module:
        """The module whose state dict is the head's: the FSDP1 wrapper (it gathers the shards),
        else the head itself (DDP's wrapper would add ``module.`` to every name)."""
        wrapper = self.wrapper
        return wrapper if self.strategy == "fsdp" and wrapper is not None else self.module

    def call(self, *args: object) -> Tensor:
        """Call the head through its wrapper, so the wrapper gathers and synchronises."""
        return (self.wrapper or self.module)(*args)

    @property
    def sharded(self) -> str:
        """``"fsdp"`` or ``"fsdp2"`` when FSDP accumulates the head's gradients itself, else ``""``."""
        return self.strategy if self.strategy in ("fsdp", "fsdp2") else ""

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer steps: the head's, or its wrapper's."""
        return (self.wrapper or self.module).parameters()

    def trainable(self) -> list[nn.Parameter]:
        """The parameters that take gradients, as ``call`` reaches them."""
        return [p for p in self.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def standing_in(self, params: Sequence[nn.Parameter], aliases: Sequence[nn.Parameter]) -> Iterator[None]:
        """Calls inside see each of ``aliases`` in place of the parameter at the same position of ``params``."""
        by_id = {id(p): alias for p, alias in zip(params, aliases)}
        target = self.wrapper or self.module
        slots = []
        for name, p in target.named_parameters(remove_duplicate=False):  # every name of a shared parameter
            if id(p) in by_id:
                owner, _, attr = name.rpartition(".")
                slots.append((target.get_submodule(owner), attr, p))
        try:
            for module, attr, p in slots:
                setattr(module, attr, by_id[id(p)])
            yield
        finally:
            for module, attr, p in slots:
                setattr(module, attr, p)

    def clip_and_step(self) -> Tensor | None:
        """Average (replicated), clip, step and zero; the norm before clipping (``None`` without clipping)."""
        params = self.trainable()
        if self.strategy == "replicate":
            average_gradients(params)
        norm = None
        if self.max_grad_norm is not None:
            wrapper = self.wrapper
            if self.strategy == "fsdp" and wrapper is not None:
                norm = wrapper.clip_grad_norm_(self.max_grad_norm)  # type: ignore[operator]  # over all shards
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the gradient synchronisation of a DDP/FSDP head (micro-steps before the last)."""
        wrapper = self.wrapper
        if self.strategy in ("ddp", "fsdp") and wrapper is not None:
            with wrapper.no_sync():  # type: ignore[operator]
                yield
        elif self.strategy == "fsdp2":
            self.module.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            yield
