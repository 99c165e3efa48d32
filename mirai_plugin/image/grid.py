"""Foresight targets on a 2D token grid (raster-order image tokens, as in LlamaGen).

Legend: H, W the token grid, N = H*W tokens, (dy, dx) a grid offset, t a student
token position, q = the target position it is aligned with.

A raster AR model emits token t = r*W + c after all tokens before it. Mirai aligns
the hidden state at t with targets at its K nearest *future* grid neighbours:
offsets (dy, dx) with dy >= 0 and dx >= 0, ordered by Euclidean distance, ties
broken by raster distance dy*W + dx. For K = 3 that is {(0,0), (0,1), (1,0)}: the
token itself, its right and its lower neighbour, not the next 3 tokens in raster
order. ``order="raster"`` gives the raster window (0,0), (0,1), ..., (0,K-1) for
comparison.

Borders: ``"raster"`` shifts in the flattened sequence (q = t + dy*W + dx), so a
right neighbour at a row's end wraps to the next row's first token, and pairs with
q past the last token are dropped (the official Mirai code). ``"drop"`` keeps only
pairs whose neighbour is on the grid (no wrap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mirai_plugin.checks import Rule, check, is_int
from mirai_plugin.errors import MiraiError

ORDERS = ("grid", "raster")
BORDERS = ("raster", "drop")


def grid_offsets(k: int, order: str = "grid") -> tuple[tuple[int, int], ...]:
    """The first ``k`` target offsets ``(dy, dx)``.

    >>> grid_offsets(3)
    ((0, 0), (0, 1), (1, 0))
    >>> grid_offsets(5)
    ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2))
    >>> grid_offsets(3, order="raster")
    ((0, 0), (0, 1), (0, 2))
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MiraiError(f"k (neighbours) must be an int >= 1, got {k!r}")
    if order not in ORDERS:
        raise MiraiError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "raster":
        return tuple((0, j) for j in range(k))
    reach = math.isqrt(k) + 1  # every offset within the k nearest lies in this square
    candidates = [(dy, dx) for dy in range(reach + 1) for dx in range(reach + 1)]
    # Distance first; among equals the smaller raster shift (dx counts before dy).
    candidates.sort(key=lambda o: (o[0] ** 2 + o[1] ** 2, o[0], o[1]))
    return tuple(candidates[:k])


def grid_pairs(
    offset: tuple[int, int],
    grid: tuple[int, int],
    *,
    student_tokens: int,
    target_tokens: int,
    border: str = "raster",
) -> tuple[Tensor, Tensor]:
    """Student positions ``t`` and their target positions ``q`` for one offset.

    Args:
        offset: ``(dy, dx)``.
        grid: ``(H, W)`` of the token grid.
        student_tokens: token positions with a student hidden state (``N - 1`` when the
            model's input is the sequence without its last token).
        target_tokens: token positions the target has (``N - 1`` for an EMA copy of
            the model, ``N`` for an image encoder).
        border: ``"raster"`` or ``"drop"`` (module docstring).

    Returns:
        ``(t, q)`` long tensors of equal length.

    >>> t, q = grid_pairs((0, 1), (2, 3), student_tokens=6, target_tokens=6, border="raster")
    >>> list(zip(t.tolist(), q.tolist()))
    [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    >>> t, q = grid_pairs((0, 1), (2, 3), student_tokens=6, target_tokens=6, border="drop")
    >>> list(zip(t.tolist(), q.tolist()))
    [(0, 1), (1, 2), (3, 4), (4, 5)]
    """
    check("border", border, Rule("choice", choices=BORDERS))
    pair = "two ints such as (0, 1)"
    if isinstance(offset, (str, bytes)) or not isinstance(offset, Sequence) or len(offset) != 2 or not all(
        is_int(v) for v in offset
    ):
        raise MiraiError(f"offset must be (dy, dx), {pair}, got {offset!r}")
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != 2 or not all(
        is_int(v) and v >= 1 for v in grid
    ):
        raise MiraiError(f"grid must be (height, width), two ints >= 1, got {grid!r}")
    for name, value in (("student_tokens", student_tokens), ("target_tokens", target_tokens)):
        check(name, value, Rule("int", minimum=0))
    height, width = grid
    if student_tokens > height * width or target_tokens > height * width:
        raise MiraiError(
            f"{max(student_tokens, target_tokens)} token positions do not fit the {height}x{width} grid; "
            f"check grid and prefix_tokens"
        )
    dy, dx = offset
    t = torch.arange(student_tokens)
    q = t + dy * width + dx
    keep = (q >= 0) & (q < target_tokens)
    if border == "drop":
        column = t % width + dx
        row = t // width + dy
        keep &= (column >= 0) & (column < width) & (row < height)
    return t[keep], q[keep]
