"""A synthetic token-image world with global structure, tokenised directly (no VQ).

Legend: n images, H = W = 8 token rows and columns, V = 16 tokens (read as colours).

Each class is a pattern family with one global rule, chosen so that a raster-order
AR model must carry a decision made early to tokens far later in the sequence:

* ``mirror``: left-right mirror symmetry. The left half is drawn from three colours
  of the image; every token in the right half must copy its partner in the same row.
* ``rectangle``: one rectangle outline of a colour on a plain background. The top
  edge fixes the left and right columns; the model must keep both sides on those
  columns for every row and close the shape with a bottom edge of the same span.
* ``recurrence``: the top row is one colour, rows 1-6 are uniform noise, and the
  bottom row must repeat the top colour, 48 noise tokens later.

``satisfies`` checks the rules exactly; changing any single token of a mirror or
rectangle image breaks its rule, and so does changing any top- or bottom-row token of
a recurrence image (its noise rows are free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FAMILIES = ("mirror", "rectangle", "recurrence")
VOCAB = 16
SIZE = 8

# 16 distinct colours, one per token, for pictures of the samples.
PALETTE = (
    (0, 0, 0), (255, 255, 255), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (128, 128, 128),
)


@dataclass(frozen=True)
class ImageWorld:
    """Class-conditional token images; ``sample`` is deterministic per seed."""

    size: int = SIZE
    vocab: int = VOCAB

    @property
    def classes(self) -> int:
        return len(FAMILIES)

    @property
    def tokens(self) -> int:
        return self.size * self.size

    def sample(self, n: int, seed: int, *, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(tokens (n H W) long, labels (n,) long)``; classes cycle unless ``labels`` is given."""
        g = torch.Generator().manual_seed(seed)
        if labels is None:
            labels = torch.arange(n) % self.classes
        grids = torch.empty(n, self.size, self.size, dtype=torch.long)
        for family, make in enumerate((self._mirror, self._rectangle, self._recurrence)):
            chosen = (labels == family).nonzero().flatten()
            if len(chosen):
                grids[chosen] = make(len(chosen), g)
        return grids, labels.clone()

    def _mirror(self, n: int, g: torch.Generator) -> Tensor:
        colours = torch.stack([torch.randperm(self.vocab, generator=g)[:3] for _ in range(n)])  # (n 3)
        half = colours.gather(1, torch.randint(3, (n, self.size * self.size // 2), generator=g))
        left = half.view(n, self.size, self.size // 2)
        return torch.cat([left, left.flip(-1)], dim=-1)

    def _rectangle(self, n: int, g: torch.Generator) -> Tensor:
        s = self.size
        grids = torch.empty(n, s, s, dtype=torch.long)
        for i in range(n):
            background, colour = torch.randperm(self.vocab, generator=g)[:2].tolist()
            top, left = (int(v) for v in torch.randint(s - 2, (2,), generator=g))
            bottom = top + 2 + int(torch.randint(s - top - 2, (1,), generator=g))
            right = left + 2 + int(torch.randint(s - left - 2, (1,), generator=g))
            grid = torch.full((s, s), background)
            grid[top, left : right + 1] = grid[bottom, left : right + 1] = colour
            grid[top : bottom + 1, left] = grid[top : bottom + 1, right] = colour
            grids[i] = grid
        return grids

    def _recurrence(self, n: int, g: torch.Generator) -> Tensor:
        s = self.size
        colour = torch.randint(self.vocab, (n,), generator=g)
        noise = torch.randint(self.vocab, (n, s - 2, s), generator=g)
        edge = colour[:, None, None].expand(n, 1, s)
        return torch.cat([edge, noise, edge], dim=1)


def satisfies(grids: Tensor, labels: Tensor) -> Tensor:
    """Whether each image obeys its family's rule: ``(n,)`` bool.

    >>> world = ImageWorld()
    >>> grids, labels = world.sample(6, seed=0)
    >>> satisfies(grids, labels).tolist()
    [True, True, True, True, True, True]
    >>> grids[0, 0, 0] = (grids[0, 0, 0] + 1) % VOCAB  # break the mirror
    >>> satisfies(grids, labels).tolist()
    [False, True, True, True, True, True]
    """
    checks = (_is_mirror, _is_rectangle, _is_recurrence)
    return torch.tensor([checks[int(label)](grid) for grid, label in zip(grids, labels)], dtype=torch.bool)


def _is_mirror(grid: Tensor) -> bool:
    return bool(torch.equal(grid, grid.flip(-1)))


def _is_rectangle(grid: Tensor) -> bool:
    colours = grid.unique()
    if len(colours) != 2:
        return False
    return any(_is_outline(grid == c) for c in colours.tolist())


def _is_outline(mask: Tensor) -> bool:
    """``mask`` is exactly the outline of its bounding box, at least 3x3."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if bottom - top < 2 or right - left < 2:
        return False
    outline = torch.zeros_like(mask)
    outline[top, left : right + 1] = outline[bottom, left : right + 1] = True
    outline[top : bottom + 1, left] = outline[top : bottom + 1, right] = True
    return bool(torch.equal(mask, outline))


def _is_recurrence(grid: Tensor) -> bool:
    return bool((grid[0] == grid[0, 0]).all() and (grid[-1] == grid[0, 0]).all())


def nll_per_token(grids: Tensor, labels: Tensor) -> float:
    """The generator's own negative log-likelihood of true images, in nats per token: the
    lowest validation loss any model can reach on them (the data's entropy, estimated).

    >>> grids, labels = ImageWorld().sample(3, seed=0, labels=torch.tensor([2, 2, 2]))
    >>> round(nll_per_token(grids, labels), 4) == round(49 * math.log(16) / 64, 4)
    True
    """
    size, vocab = grids.shape[-1], VOCAB
    total = 0.0
    for grid, label in zip(grids, labels.tolist()):
        if FAMILIES[label] == "mirror":  # 3 colours, then 32 left-half tokens among them
            seen = len(grid[:, : size // 2].unique())
            sets_with_seen = math.comb(vocab - seen, 3 - seen)
            total += -math.log(sets_with_seen / math.comb(vocab, 3)) + size * size // 2 * math.log(3)
        elif FAMILIES[label] == "rectangle":  # colour pair, top, left, then bottom and right given them
            colours = grid.unique().tolist()
            mask = next(grid == c for c in colours if _is_outline(grid == c))
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            top, left = int(rows[0]), int(cols[0])
            total += math.log(vocab * (vocab - 1)) + 2 * math.log(size - 2)
            total += math.log(size - top - 2) + math.log(size - left - 2)
        else:  # the colour, then the noise rows
            total += (1 + (size - 2) * size) * math.log(vocab)
    return total / (len(grids) * size * size)
