"""Looking through the wrappers trainers put around a model: one registry, used everywhere.

A *wrapper* holds one module and calls it the same way: DDP and DeepSpeed ``.module``,
FSDP1 ``_fsdp_wrapped_module``, activation checkpointing ``_checkpoint_wrapped_module``,
``torch.compile`` ``_orig_mod``, PEFT ``base_model`` then its tuner's ``.model``. A
*container* holds the transformer but has its own call convention: Self-Forcing's
``WanDiffusionWrapper`` ``.model``, a diffusers pipeline's ``.transformer``. Containers are
followed to find blocks or the patch size, never to decide how to call a model. FSDP2
(``fully_shard``) wraps in place and needs no entry.

Capture, the frozen encoder, the trainer glue and official-checkpoint loading all read this
registry, so a new wrapper type is one ``register_wrapper`` call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from mirai_plugin.checks import is_int
from mirai_plugin.errors import MiraiError

__all__ = [
    "CONTAINER_ATTRIBUTES",
    "Wrapper",
    "declared_patch_size",
    "patch_size",
    "register_wrapper",
    "strip_wrapper_prefixes",
    "token_count",
    "tokens_per_frame",
    "unregister_wrapper",
    "unwrap",
    "wrapper_attributes",
    "wrapper_chain",
]

CONTAINER_ATTRIBUTES = ("model", "transformer")
_MAX_DEPTH = 8
_WAN_PATCH = (1, 2, 2)  # Wan 2.1 / 2.2: one latent frame, 2x2 latent pixels per token


@dataclass(frozen=True)
class Wrapper:
    """A wrapper type: the child attribute holding the wrapped module.

    ``applies`` narrows it to some classes (PEFT's ``.model`` is a tuner's, not any
    module's); ``in_state_dict`` says whether the attribute shows as a key prefix in the
    wrapper's state dict, to be stripped when reading checkpoints written through it.
    """

    attribute: str
    applies: Callable[[nn.Module], bool] | None = None
    in_state_dict: bool = True

    def inner(self, module: nn.Module) -> nn.Module | None:
        child = module._modules.get(self.attribute)
        if not isinstance(child, nn.Module) or (self.applies is not None and not self.applies(module)):
            return None
        return child


def _from_peft(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "peft"


# Built in: the entries every part of the package relies on; unregister_wrapper never removes them.
_BUILT_IN: tuple[Wrapper, ...] = (
    Wrapper("module"),  # DDP, DeepSpeed
    Wrapper("_fsdp_wrapped_module"),
    Wrapper("_checkpoint_wrapped_module"),
    Wrapper("_orig_mod"),
    Wrapper("base_model", applies=_from_peft, in_state_dict=False),
    Wrapper("model", applies=_from_peft, in_state_dict=False),
)
_WRAPPERS: list[Wrapper] = list(_BUILT_IN)  # the built-in entries, then the user's in registration order


def register_wrapper(attribute: str, *, applies: Callable[[nn.Module], bool] | None = None,
                     in_state_dict: bool = True) -> Wrapper:
    """Teach the package a wrapper type that holds its model at ``attribute``.

    ``applies(module) -> bool`` narrows it to some classes; ``in_state_dict`` says whether
    ``attribute`` shows as a key prefix in the wrapper's state dict. Every argument is
    checked here, not when a model is first unwrapped.

    Example:
        >>> import torch.nn as nn
        >>> class Engine(nn.Module):
        ...     def __init__(self, inner):
        ...         super().__init__()
        ...         self.wrapped_engine = inner
        >>> wrapper = register_wrapper("wrapped_engine")
        >>> inner = nn.Linear(2, 2)
        >>> unwrap(Engine(inner)) is inner
        True
        >>> unregister_wrapper("wrapped_engine")
    """
    if not isinstance(attribute, str) or not attribute.isidentifier():
        raise MiraiError(f"attribute must be a child-module name such as 'module', got {attribute!r}")
    if isinstance(applies, type):  # a class is callable, but calling it builds an object, always truthy
        raise MiraiError(
            f"applies must be a test applies(module) -> bool, got the class {applies.__name__}; "
            f"pass applies=lambda m: isinstance(m, {applies.__name__})"
        )
    if applies is not None and not callable(applies):
        raise MiraiError(
            f"applies must be None or a callable applies(module) -> bool, got {type(applies).__name__} {applies!r}; "
            f"e.g. applies=lambda m: type(m).__name__ == 'MyEngine'"
        )
    if not isinstance(in_state_dict, bool):
        raise MiraiError(
            f"in_state_dict must be True or False, got {in_state_dict!r}; True when {attribute!r} shows as a key "
            f"prefix ('{attribute}.') in the wrapper's state dict"
        )
    if any(w.attribute == attribute and w.applies is applies for w in _WRAPPERS):
        where = "built in" if any(w.attribute == attribute for w in _BUILT_IN) else "registered"
        raise MiraiError(f"a wrapper at {attribute!r} is already {where}")
    wrapper = Wrapper(attribute, applies, in_state_dict)
    _WRAPPERS.append(wrapper)
    return wrapper


def unregister_wrapper(wrapper: str | Wrapper) -> None:
    """Forget wrapper types added by ``register_wrapper``: the one it returned, or all of them at an attribute.

    The built-in entries (DDP's ``module``, FSDP, checkpointing, compile, PEFT) stay.
    """
    user = _WRAPPERS[len(_BUILT_IN):]
    if isinstance(wrapper, Wrapper):
        kept = [w for w in user if w is not wrapper]
        name = wrapper.attribute
    elif isinstance(wrapper, str):
        kept = [w for w in user if w.attribute != wrapper]
        name = wrapper
    else:
        raise MiraiError(
            f"unregister_wrapper takes the attribute or the Wrapper that register_wrapper returned, "
            f"got {type(wrapper).__name__}"
        )
    if len(kept) == len(user):
        built_in = " (a built-in entry, which stays)" if any(w.attribute == name for w in _BUILT_IN) else ""
        raise MiraiError(f"no wrapper is registered at {name!r} by register_wrapper{built_in}")
    _WRAPPERS[len(_BUILT_IN):] = kept


def wrapper_attributes(*, containers: bool = False) -> tuple[str, ...]:
    """Every attribute that leads from a wrapper (and, with ``containers``, a container) inward."""
    names = dict.fromkeys(w.attribute for w in _WRAPPERS)
    if containers:
        names.update(dict.fromkeys(CONTAINER_ATTRIBUTES))
    return tuple(names)


def _inner(module: nn.Module, containers: bool) -> tuple[nn.Module, str] | None:
    for wrapper in _WRAPPERS:
        child = wrapper.inner(module)
        if child is not None:
            return child, wrapper.attribute
    if containers:
        for attribute in CONTAINER_ATTRIBUTES:
            child = module._modules.get(attribute)
            if isinstance(child, nn.Module):
                return child, attribute
    return None


def wrapper_chain(model: nn.Module, *, containers: bool = False) -> list[tuple[nn.Module, str]]:
    """``[(module, path), ...]``: the model and what its wrappers wrap, outermost first.

    >>> import torch.nn as nn
    >>> ddp_like = nn.Module()
    >>> ddp_like.module = nn.Linear(2, 2)
    >>> [path for _, path in wrapper_chain(ddp_like)]
    ['Module', 'Module.module']
    """
    chain, module, path = [], model, type(model).__name__
    for _ in range(_MAX_DEPTH):
        chain.append((module, path))
        step = _inner(module, containers)
        if step is None:
            break
        module, path = step[0], f"{path}.{step[1]}"
    return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside every wrapper: the one whose ``forward`` defines the call."""
    return wrapper_chain(model)[-1][0]


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without the prefixes wrappers add (``module.``, ``_orig_mod.``, ...).

    >>> strip_wrapper_prefixes("module._fsdp_wrapped_module.blocks.0.q.weight")
    'blocks.0.q.weight'
    """
    names = [re.escape(w.attribute) for w in _WRAPPERS if w.in_state_dict]
    pattern = re.compile(rf"(^|\.)(?:{'|'.join(names)})\.")
    while True:
        stripped = pattern.sub(r"\1", key)
        if stripped == key:
            return key
        key = stripped


def declared_patch_size(model: nn.Module, *, fix: str = "") -> tuple[int, int, int] | None:
    """``(p_t, p_h, p_w)`` the model declares, through wrappers and containers, or ``None``.

    diffusers keeps it in ``config.patch_size`` (the attribute there is deprecated), Wan's
    ``WanModel`` as an attribute. A declared size that is not three ints >= 1 (a ViT's
    ``16``, CogVideoX's ``2``) is refused: the model is not a Wan transformer.
    """
    for module, path in wrapper_chain(model, containers=True):
        value, where = getattr(getattr(module, "config", None), "patch_size", None), f"{path}.config.patch_size"
        if value is None:
            value, where = getattr(module, "patch_size", None), f"{path}.patch_size"
        if value is None:
            continue
        values = tuple(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else ()
        if len(values) != 3 or not all(is_int(v) and v >= 1 for v in values):
            raise MiraiError(
                f"{where} is {value!r}, not Wan's (p_t, p_h, p_w) of three ints >= 1 (Wan 2.1/2.2: (1, 2, 2)): "
                f"{type(module).__name__} is not a Wan transformer" + (f"; {fix}" if fix else "")
            )
        return int(values[0]), int(values[1]), int(values[2])
    return None


def patch_size(model: nn.Module) -> tuple[int, int, int]:
    """``(p_t, p_h, p_w)`` of a Wan-style model, through wrappers and containers.

    What the model declares (``declared_patch_size``), else Wan's ``(1, 2, 2)``.
    """
    return declared_patch_size(model) or _WAN_PATCH


def token_count(model: nn.Module, frames: int, height: int, width: int) -> int:
    """Tokens the model makes of ``frames`` latent frames of ``height x width``."""
    p_t, p_h, p_w = patch_size(model)
    if frames % p_t or height % p_h or width % p_w:
        raise MiraiError(
            f"latent size {frames}x{height}x{width} (frames x height x width) is not divisible by the model's patch "
            f"size {(p_t, p_h, p_w)}; crop or pad the latents to a multiple of it"
        )
    return (frames // p_t) * (height // p_h) * (width // p_w)


def tokens_per_frame(model: nn.Module, height: int, width: int) -> int:
    """``s``: tokens per latent frame of ``height x width`` (the patch's time stride aside)."""
    p_t, _, _ = patch_size(model)
    return token_count(model, p_t, height, width)
