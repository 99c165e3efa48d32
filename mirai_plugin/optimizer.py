"""The head's own optimizer: AdamW made on first use, gradient averaging, clipping, and the
data-parallel wrapper it steps through.

A head is replicated by default: every rank keeps a full copy and ``clip_and_step``
averages the gradients first. ``mirai_plugin.distributed.shard_head`` attaches a DDP or
FSDP1 wrapper (or FSDP2, in place) through ``attach``; the optimizer is then made over
the wrapper's parameters and clipping uses the wrapper's global norm. The video and the
image heads both hold one. ``state_problems`` checks an optimizer state against the head
before any of it loads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin.collectives import average_gradients
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import dtype_kind

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
        # The full state's names, shapes and dtypes as meta tensors (no memory), recorded before any
        # wrapper: FSDP replaces the live parameters with shards, the full state keeps these.
        self.layout = {name: torch.empty_like(t, device="meta") for name, t in module.state_dict().items()}
        self._stand_ins = [
            (name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
            for name, p in module.named_parameters()
        ]

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

    def state_problems(self, state: Any) -> str:
        """What keeps ``state`` (a full optimizer state as ``gather_state`` returns it, or the
        optimizer's own ``state_dict()``, keyed by index) from loading ("" when nothing).

        Checked against an optimizer made the same way over meta stand-ins of the head's
        parameters: the parameter groups and their names, the hyperparameters, and each
        parameter's entries (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq`` of its full shape).
        """
        if not (isinstance(state, Mapping) and isinstance(state.get("state"), Mapping)
                and isinstance(state.get("param_groups"), (list, tuple))):
            got = f"keys {sorted(map(str, state))[:6]}" if isinstance(state, Mapping) else type(state).__name__
            return f"not an optimizer state (a dict with 'state' and 'param_groups'), got {got}"
        saved = state["param_groups"]
        if not all(isinstance(group, Mapping) and isinstance(group.get("params"), (list, tuple)) for group in saved):
            return "a parameter group without its 'params' list"
        keys = [key for group in saved for key in group["params"]]
        by_index = all(type(key) is int for key in keys)
        if not by_index and not all(isinstance(key, str) for key in keys):
            return "parameter groups must list parameter names (or, as optimizer.state_dict() writes, indices)"
        if by_index and self.strategy not in ("replicate", "ddp"):
            return (f"an optimizer state keyed by parameter index loads only into an unsharded head, not under "
                    f"{self.strategy!r}; save the state with training_state()")
        if len(set(keys)) != len(keys):
            return "a parameter is listed twice in the parameter groups"

        stand_in = self.make(p for _, p in self._stand_ins)
        names = {id(p): name for name, p in self._stand_ins}
        if len(saved) != len(stand_in.param_groups):
            return f"{len(saved)} parameter groups, this optimizer has {len(stand_in.param_groups)}"
        owner: dict[Any, str] = {}  # saved key -> parameter name
        problems = []
        for i, (group, live) in enumerate(zip(saved, stand_in.param_groups)):
            mine = [names[id(p)] for p in live["params"]]
            if by_index and len(group["params"]) != len(mine):
                problems.append(f"group {i} has {len(group['params'])} parameters, this optimizer's {len(mine)}")
            elif not by_index and set(group["params"]) != set(mine):
                extra, absent = sorted(set(group["params"]) - set(mine)), sorted(set(mine) - set(group["params"]))
                if extra:
                    problems.append(f"group {i} lists parameters this head lacks {extra[:4]}")
                if absent:
                    problems.append(f"group {i} lacks this head's {absent[:4]}")
            owner.update(zip(group["params"], mine) if by_index else ((name, name) for name in group["params"]))
            problems += hyperparameter_problems(i, group, live)
        entries = state["state"]
        unknown = [key for key in entries if key not in owner]
        if unknown:
            problems.append(f"state for parameters the groups do not list: {unknown[:6]}")
        trained = {name for name, p in self._stand_ins if p.requires_grad}
        # By name, torch's loader keeps the live entry of a parameter the state lacks (or refuses it).
        stateless = [key for key in owner if not by_index and key not in entries and owner[key] in trained]
        if stateless:
            problems.append(f"no state for parameters {stateless[:6]}")
        if problems:
            return "; ".join(problems[:6])

        adam = isinstance(stand_in, (torch.optim.Adam, torch.optim.AdamW))
        amsgrad = {key: bool(group.get("amsgrad")) for group in saved for key in group["params"]}
        for key, entry in entries.items():
            problems += entry_problems(key, entry, self.layout[owner[key]].shape, adam=adam, amsgrad=amsgrad[key])
        if not adam and len({frozenset(entry) for entry in entries.values() if isinstance(entry, Mapping)}) > 1:
            problems.append("parameters hold different kinds of optimizer state")
        return "; ".join(problems[:6])

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


def hyperparameter_problems(index: int, saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """A saved group's hyperparameters, against a freshly made group's: the numbers (``lr``, ``betas``,
    ``eps``, ``weight_decay``) present and numbers, the flags bools (torch adds new flags with defaults)."""
    problems = []
    for key, default in live.items():
        if key in ("params", "param_names"):
            continue
        if is_number(default) or isinstance(default, Tensor):
            if key not in saved:
                problems.append(f"group {index} has no {key!r}")
            elif not (is_number(saved[key]) or (isinstance(saved[key], Tensor) and saved[key].numel() == 1)):
                problems.append(f"group {index} {key}={saved[key]!r} is not a number")
        elif isinstance(default, (tuple, list)):
            value = saved.get(key)
            if not (isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(is_number, value))):
                problems.append(f"group {index} {key}={value!r} is not {len(default)} numbers")
        elif isinstance(default, bool) or default is None:
            if key in saved and not (isinstance(saved[key], bool) or saved[key] is None):
                problems.append(f"group {index} {key}={saved[key]!r} is not a bool")
    return problems


ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})


def entry_problems(key: Any, entry: Any, shape: torch.Size, *, adam: bool, amsgrad: bool) -> list[str]:
    """One parameter's optimizer state: ``step`` a count >= 0, the other tensors float of the parameter's shape."""
    if not isinstance(entry, Mapping):
        return [f"state of {key!r} is a {type(entry).__name__}, not a dict"]
    if adam:
        needed = ADAM_STATE | ({"max_exp_avg_sq"} if amsgrad else set())
        if not needed <= set(entry) <= ADAM_STATE | {"max_exp_avg_sq"}:
            return [f"state of {key!r} holds {sorted(entry)}, AdamW's holds {sorted(needed)}"]
    problems = []
    for name, value in entry.items():
        if name == "step":
            if not is_count(value):
                problems.append(f"step of {key!r} is {value!r}, not a count of steps")
        elif value is None and not adam:  # e.g. SGD's momentum_buffer before its first step
            continue
        elif not isinstance(value, Tensor) or value.is_meta or dtype_kind(value.dtype) != "float":
            what = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
            problems.append(f"{name} of {key!r} is {what}, not a float tensor")
        elif value.shape != shape:
            problems.append(f"{name} of {key!r} has shape {tuple(value.shape)}, the parameter {tuple(shape)}")
    return problems


def is_count(value: Any) -> bool:
    """A whole number >= 0: an int or float, or a real one-element tensor (AdamW keeps ``step`` as one)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_meta or value.is_complex() or value.dtype == torch.bool:
            return False
        value = value.item()
    return is_number(value) and math.isfinite(value) and value >= 0 and float(value).is_integer()


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
