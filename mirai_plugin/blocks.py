"""Finding the block list of a transformer through the wrappers trainers put around it.

A block list is an ``nn.ModuleList`` (Wan, LlamaGen) or an ``nn.Sequential`` (timm's ViT and
many others): both index their blocks, and hooks on ``blocks[layer]`` fire either way.
"""

from __future__ import annotations

from torch import nn

from mirai_plugin.errors import MiraiError
from mirai_plugin.wrappers import wrapper_attributes, wrapper_chain

_MAX_DEPTH = 8
BlockList = nn.ModuleList | nn.Sequential
_BLOCK_LISTS = (nn.ModuleList, nn.Sequential)


def find_blocks(model: nn.Module, blocks: str | BlockList | None = None) -> tuple[BlockList, str]:
    """Return ``(block_list, path)`` for a block-structured transformer.

    ``blocks`` may name the list explicitly: a ``ModuleList`` / ``Sequential`` or a
    dotted attribute path from ``model`` (e.g. ``"model.blocks"`` or ``"layers"``).
    Otherwise the first ``.blocks`` ``ModuleList`` or ``Sequential`` reached through
    known wrappers is used.

    >>> import torch.nn as nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    >>> found, path = find_blocks(Net())
    >>> len(found), path
    (3, 'Net.blocks')
    """
    if not isinstance(model, nn.Module):
        raise MiraiError(f"model must be an nn.Module (the transformer, bare or wrapped), got {type(model).__name__}")
    root = type(model).__name__
    if isinstance(blocks, _BLOCK_LISTS):
        return blocks, f"{root}.<given {type(blocks).__name__}>"
    if isinstance(blocks, str):
        # The name is relative to the model or to what a known wrapper (DDP, compile...) wraps.
        for module, path in wrapper_chain(model, containers=True):
            try:
                found = module.get_submodule(blocks)
            except AttributeError:
                continue
            if not isinstance(found, _BLOCK_LISTS):
                raise MiraiError(
                    f"blocks={blocks!r} on {path} is a {type(found).__name__}, not an nn.ModuleList or "
                    f"nn.Sequential of blocks; block lists present: {_module_lists(model)}"
                )
            return found, f"{path}.{blocks}"
        raise MiraiError(f"blocks={blocks!r} does not exist on {root}; block lists present: {_module_lists(model)}")
    if blocks is not None:
        raise MiraiError(
            f"blocks must be None, a dotted path, an nn.ModuleList or an nn.Sequential, got {type(blocks).__name__}"
        )

    frontier: list[tuple[nn.Module, str]] = [(model, root)]
    seen: set[int] = set()
    for _ in range(_MAX_DEPTH):
        next_frontier = []
        for module, path in frontier:
            if id(module) in seen:
                continue
            seen.add(id(module))
            candidate = module._modules.get("blocks")
            if isinstance(candidate, _BLOCK_LISTS):
                return candidate, f"{path}.blocks"
            for attr in wrapper_attributes(containers=True):
                inner = module._modules.get(attr)
                if isinstance(inner, nn.Module):
                    next_frontier.append((inner, f"{path}.{attr}"))
        frontier = next_frontier
        if not frontier:
            break
    raise MiraiError(
        f"no block list found in {root}: looked for a `.blocks` nn.ModuleList or nn.Sequential through the "
        f"wrappers {', '.join(wrapper_attributes(containers=True))}. Block lists present: {_module_lists(model)}. "
        f"Pass blocks='<dotted.path>' to name the list."
    )


def block_at(model: nn.Module, layer: int, blocks: str | BlockList | None = None) -> tuple[nn.Module, str]:
    """The module ``blocks[layer]`` and a printable location; clear error when out of range."""
    block_list, path = find_blocks(model, blocks)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(block_list):
        raise MiraiError(
            f"layer {layer!r} out of range: {path} has {len(block_list)} blocks "
            f"(0..{len(block_list) - 1}); layers are 0-based block indices"
        )
    return block_list[layer], f"{path}[{layer}]"


def _module_lists(model: nn.Module, limit: int = 10) -> str:
    """The block lists in ``model``, outermost only (a block's own MLP ``Sequential`` is left out),
    ``ModuleList`` first."""
    outer: list[tuple[str, BlockList]] = []
    for name, module in model.named_modules():  # pre-order: a list comes before what it holds
        if isinstance(module, _BLOCK_LISTS) and not any(name.startswith(f"{kept}.") for kept, _ in outer if kept):
            outer.append((name, module))
    outer.sort(key=lambda item: not isinstance(item[1], nn.ModuleList))
    found = [
        f"{name or '<root>'} ({'' if isinstance(module, nn.ModuleList) else 'Sequential, '}{len(module)})"
        for name, module in outer
    ]
    if not found:
        return "none"
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more
