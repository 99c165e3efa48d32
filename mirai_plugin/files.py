"""Reading checkpoint and tensor files: one ``MiraiError`` naming the file and the problem.

PyTorch files are read with ``weights_only=True`` only: a checkpoint that needs
arbitrary Python objects is refused, never unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mirai_plugin.errors import MiraiError


def file_path(path: Any, *, what: str) -> str:
    """``path`` as a string, naming ``what`` when it is not a path or no such file exists."""
    if not isinstance(path, (str, os.PathLike)):
        raise MiraiError(f"{what} must be a file path (str or os.PathLike), got {type(path).__name__}")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise MiraiError(f"{what}: no such file: {name}")
    if os.path.isdir(name):
        raise MiraiError(f"{what}: {name} is a folder, not a file")
    return name


def load_checkpoint(path: Any, *, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors."""
    name = file_path(path, what=what)
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:
            # PyTorch's own message advises weights_only=False (arbitrary code execution): keep only the cause.
            raise MiraiError(
                f"{what} {name} cannot be read safely: it holds a Python object of type {found.group(1)}, and "
                f"mirai_plugin reads checkpoints with weights_only=True (tensors, numbers, strings and containers "
                f"only); save a plain state dict instead"
            ) from None
        raise MiraiError(f"{what} {name} is not a PyTorch checkpoint (corrupt, or another format)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        reason = (str(error).split(". ")[0].strip() if isinstance(error, RuntimeError) else "") or type(error).__name__
        raise MiraiError(
            f"{what} {name} is not a PyTorch checkpoint (truncated, corrupt or another format: {reason})"
        ) from None
    except OSError as error:
        raise MiraiError(f"{what} {name} cannot be read: {error.strerror or error}") from None


def read_safetensors(path: Any, *, what: str = "safetensors file") -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file, with clear errors."""
    from safetensors import SafetensorError, safe_open

    name = file_path(path, what=what)
    try:
        with safe_open(name, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise MiraiError(
            f"{what} {name} is not a readable safetensors file (truncated or another format: {error})"
        ) from None
    except OSError as error:
        raise MiraiError(f"{what} {name} cannot be read: {error.strerror or error}") from None
    return tensors, metadata


def state_problems(expected: Mapping[str, Tensor], state: Mapping[str, Any]) -> str:
    """What keeps ``state`` from loading into a module whose state dict is ``expected`` ("" when nothing).

    Names, shapes and the kind of each dtype (floating, complex, integer, bool) must match:
    ``load_state_dict`` casts between float precisions, but an integer tensor in a float
    parameter, or a meta tensor (a shape without values), would load as something else.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(name for name in set(state) & set(expected))
    not_tensors = [name for name in common if not isinstance(state[name], Tensor)]
    tensors = [name for name in common if isinstance(state[name], Tensor)]
    wrong = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs head {tuple(expected[name].shape)}"
        for name in tensors
        if state[name].shape != expected[name].shape
    ]
    kinds = [
        f"{name}: checkpoint {state[name].dtype} vs head {expected[name].dtype}"
        for name in tensors
        if dtype_kind(state[name].dtype) != dtype_kind(expected[name].dtype)
    ]
    meta = [name for name in tensors if state[name].is_meta]
    parts = (
        f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}" if missing else "",
        f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "",
        f"not tensors {not_tensors[:6]}" if not_tensors else "",
        f"wrong shapes {wrong[:6]}" if wrong else "",
        f"wrong dtypes {kinds[:6]}" if kinds else "",
        f"meta tensors (no values) {meta[:6]}" if meta else "",
    )
    return "; ".join(part for part in parts if part)


def dtype_kind(dtype: torch.dtype) -> str:
    """``"float"``, ``"complex"``, ``"bool"`` or ``"int"``: what a cast between dtypes keeps."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"
