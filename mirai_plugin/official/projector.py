"""Reading the projector written by the official Video-Mirai trainer into a head.

The official trainer saves ``mirai_projector`` (a DiT projector) and, when the
student and encoder widths differ, ``foresight_dim_proj`` (a bias-free linear)
next to the generator. This module maps those names onto ``ForesightHead``'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import load_checkpoint, state_problems
from mirai_plugin.wrappers import strip_wrapper_prefixes

# Official per-block names -> ours (block index kept).
_BLOCK_NAMES = {
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "o": "to_out",
    "norm_q": "norm_q",
    "norm_k": "norm_k",
    "ffn.0": "ffn_in",
    "ffn.2": "ffn_out",
}
_OFFSET_EMBEDDER_NAMES = {"delta_embedder.mlp.0": "fc1", "delta_embedder.mlp.2": "fc2"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
_EMBEDDER_KEY = re.compile(r"(delta_embedder\.mlp\.\d)\.(weight|bias)$")


def _strip(state: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """Wrapper prefixes removed; every value must be a tensor."""
    if not isinstance(state, Mapping):
        raise MiraiError(f"{what} must be a state dict (name -> tensor), got {type(state).__name__}")
    not_tensors = [f"{key} ({type(value).__name__})" for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise MiraiError(
            f"{what} must map names to tensors; these entries are not tensors: {not_tensors[:6]}"
            f"{' ...' if len(not_tensors) > 6 else ''}"
        )
    return {strip_wrapper_prefixes(key): value for key, value in state.items()}


def official_to_head_state(
    projector: Mapping[str, Tensor],
    dim_proj: Mapping[str, Tensor] | None,
    config: ForesightConfig | None,
) -> tuple[ForesightConfig, int, int, dict[str, Tensor]]:
    """Translate official state dicts into ``(config, student_dim, encoder_dim, head_state)``."""
    projector = _strip(projector, "the official projector (mirai_projector)")
    if "blocks.0.q.weight" not in projector:
        raise MiraiError(
            f"not an official DiT projector state dict (no 'blocks.0.q.weight'); keys start with "
            f"{sorted(projector)[:6]}"
        )
    student_dim = projector["blocks.0.q.weight"].shape[0]
    depth = len({m.group(1) for key in projector if (m := _BLOCK_KEY.match(key))})
    ffn_dim = projector["blocks.0.ffn.0.weight"].shape[0] if "blocks.0.ffn.0.weight" in projector else None
    heads_meta = projector.get("_num_heads_meta")
    if heads_meta is not None and heads_meta.numel() != 1:
        raise MiraiError(f"_num_heads_meta must hold one number, got a tensor of shape {tuple(heads_meta.shape)}")
    num_heads = int(heads_meta.item()) if heads_meta is not None else None

    encoder_dim = student_dim
    dim_state = {}
    if dim_proj is not None:
        dim_proj = _strip(dim_proj, "foresight_dim_proj")
        weight = dim_proj.get("weight")
        if weight is None or set(dim_proj) != {"weight"}:
            raise MiraiError(f"foresight_dim_proj must hold exactly a bias-free 'weight', got keys {sorted(dim_proj)}")
        encoder_dim = weight.shape[0]
        dim_state["project.weight"] = weight

    from_checkpoint: dict[str, Any] = {"predictor": "dit", "predictor_depth": depth}
    if num_heads is not None:
        from_checkpoint["num_heads"] = num_heads
    if ffn_dim is not None:
        from_checkpoint["ffn_ratio"] = ffn_dim / student_dim
    if config is None:
        config = ForesightConfig(**from_checkpoint)
    else:
        clashes = [
            f"{name}={getattr(config, name)!r} (checkpoint: {value!r})"
            for name, value in from_checkpoint.items()
            if getattr(config, name) != value and not (name == "num_heads" and config.num_heads is None)
        ]
        if clashes:
            raise MiraiError(f"config disagrees with the official projector: {', '.join(clashes)}")
        config = config.replace(**from_checkpoint)

    state: dict[str, Tensor] = dict(dim_state)
    unexpected = []
    for key, value in projector.items():
        if key == "_num_heads_meta":
            continue
        if m := _BLOCK_KEY.match(key):
            index, name, kind = m.groups()
            if name in _BLOCK_NAMES:
                state[f"predictor.blocks.{index}.{_BLOCK_NAMES[name]}.{kind}"] = value
                continue
            if name == "adaLN_modulation.1":
                if config.offset_conditioning:
                    state[f"predictor.blocks.{index}.modulation.{kind}"] = value
                elif kind == "bias":
                    state[f"predictor.blocks.{index}.modulation_bias"] = value
                # Without offset conditioning the official AdaLN input is a zero vector,
                # so its weight never acts (nor, being zero-initialised, ever moves).
                continue
        elif m := _EMBEDDER_KEY.match(key):
            if config.offset_conditioning:
                state[f"predictor.offset_embedder.{_OFFSET_EMBEDDER_NAMES[m.group(1)]}.{m.group(2)}"] = value
            # Without offset conditioning the official projector feeds AdaLN a zero vector,
            # so its offset embedder is unused: dropping it changes no output.
            continue
        unexpected.append(key)
    if unexpected:
        raise MiraiError(
            f"official projector has keys mirai_plugin does not implement: {unexpected} "
            f"(timestep conditioning and cross-attention are not part of the released recipe)"
        )
    return config, student_dim, encoder_dim, state


Head = TypeVar("Head", bound=nn.Module)


def head_from_official(
    cls: type[Head],
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: ForesightConfig | None,
    dim_proj: Mapping[str, Tensor] | None,
) -> Head:
    """``cls(config, student_dim, encoder_dim)`` loaded from an official checkpoint (see
    ``ForesightHead.load_official``)."""
    where = "load_official"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        source = load_checkpoint(source, what="official checkpoint")
    if not isinstance(source, Mapping):
        raise MiraiError(
            f"load_official needs a checkpoint path or a state dict, got {type(source).__name__}"
            + (f" (read from {where})" if where != "load_official" else "")
        )
    if config is not None and not isinstance(config, ForesightConfig):
        raise MiraiError(f"config must be a ForesightConfig or None, got {type(config).__name__}")
    if "mirai_projector" in source:
        projector_sd, dim_proj = source["mirai_projector"], source.get("foresight_dim_proj", dim_proj)
    else:
        projector_sd = source
    try:
        config, student_dim, encoder_dim, state = official_to_head_state(projector_sd, dim_proj, config)
    except MiraiError as error:
        raise MiraiError(f"{where}: {error}") from None  # the same error, naming the file
    with torch.device("meta"):  # names and shapes only: a refused checkpoint leaves the random state alone
        expected = cls(config, student_dim, encoder_dim).state_dict()  # type: ignore[call-arg]
    problems = state_problems(expected, state)
    if problems:
        raise MiraiError(f"{where}: official projector does not fit the head: {problems}")
    head = cls(config, student_dim, encoder_dim)  # type: ignore[call-arg]
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return head
