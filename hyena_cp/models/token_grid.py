"""Token layout of one stage of a ViT-5 network: the single source of truth for its grid.

A stage holds ``grid_h x grid_w`` patch tokens followed by ``num_extra`` = CLS (0/1) +
registers (R) tokens, flattened row-major on a grid of width ``grid_w``::

    [patches (grid_h * grid_w) | CLS | registers | padding]

so image rows are grid rows and CLS + registers fill a *register row* at the bottom
(``ceil(num_extra / grid_w)`` rows when they do not fit in one). Padding completes the
register row and adds whole rows until ``rows % P == 0`` (P = CP size), so each rank holds
a block of ``rows / P`` whole grid rows. Padding depends on P; nothing that reaches a real
token may (the Hyena filters use a fixed positional reference, see ``filter_rows``).

Under context parallelism rank r holds the global tokens ``[r*n, (r+1)*n)`` with
``n = local_tokens``: a contiguous run of patches, then extras, then padding (each part
possibly empty), which `local_parts` describes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["StageGrid", "StageLayout", "LocalParts", "merge_source"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StageGrid:
    """The P-independent geometry of a stage: patch grid and extra (CLS + register) tokens."""

    grid_h: int
    grid_w: int
    num_extra: int

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def num_valid(self) -> int:
        """Real tokens (patches + extras): global flat positions ``>=`` this are padding."""
        return self.num_patches + self.num_extra

    @property
    def rows(self) -> int:
        """Patch rows plus register rows (the unpadded single-process grid height)."""
        return self.grid_h + _ceil_div(self.num_extra, self.grid_w)

    def filter_rows(self, max_cp_size: int) -> int:
        """Height the Hyena filter is normalised by: the tallest padded grid for any
        CP size ``<= max_cp_size``, so one filter (and its positional reference) serves
        every P and the function never depends on the padding."""
        return self.rows + max_cp_size - 1

    def merged(self) -> StageGrid:
        """The grid after a 2x2 patch merge; an odd side is zero-padded to even first."""
        return StageGrid(_ceil_div(self.grid_h, 2), _ceil_div(self.grid_w, 2), self.num_extra)

    def layout(self, world: int) -> StageLayout:
        return StageLayout(self, world)


@dataclass(frozen=True)
class LocalParts:
    """What a rank's block holds, in order: ``patches`` tokens starting at patch index
    ``patch_start``, ``extras`` starting at extra index ``extra_start``, then ``padding``."""

    patch_start: int
    patches: int
    extra_start: int
    extras: int
    padding: int

    @property
    def patch_slice(self) -> slice:
        """This rank's patch tokens as indices into the stage's patches (may be empty)."""
        return slice(self.patch_start, self.patch_start + self.patches)

    @property
    def extra_slice(self) -> slice:
        """This rank's extra tokens as indices into CLS + registers (may be empty)."""
        return slice(self.extra_start, self.extra_start + self.extras)


@dataclass(frozen=True)
class StageLayout:
    """A `StageGrid` padded for ``world`` CP ranks (``world=1``: the single-process layout)."""

    grid: StageGrid
    world: int

    @property
    def padded_rows(self) -> int:
        return _ceil_div(self.grid.rows, self.world) * self.world

    @property
    def num_tokens(self) -> int:
        return self.padded_rows * self.grid.grid_w

    @property
    def local_rows(self) -> int:
        return self.padded_rows // self.world

    @property
    def local_tokens(self) -> int:
        return self.local_rows * self.grid.grid_w

    def owner(self, position: int) -> int:
        """Rank holding the global flat ``position`` (e.g. the CLS token's)."""
        return position // self.local_tokens

    def local_parts(self, rank: int) -> LocalParts:
        grid = self.grid
        start, stop = rank * self.local_tokens, (rank + 1) * self.local_tokens
        patches = max(0, min(stop, grid.num_patches) - start)
        extra_start = max(start, grid.num_patches)
        extras = max(0, min(stop, grid.num_valid) - extra_start)
        return LocalParts(start, patches, extra_start - grid.num_patches, extras,
                          self.local_tokens - patches - extras)


@functools.lru_cache(maxsize=64)  # a pure function of two small frozen layouts
def merge_source(old: StageLayout, new: StageLayout) -> torch.Tensor:
    """Global source map for `hyena_cp.parallel.redistribute` that gathers, for every token of
    the ``new`` (merged) layout, 4 slots of the ``old`` layout: ``[new.num_tokens * 4]``.

    The returned tensor is cached and shared: do not modify it.

    Patch (i, j) takes old patches (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) — Swin's
    concatenation order — with -1 (zeros) beyond an odd old grid; extra token e takes old
    extra token e in slot 0 and zeros in slots 1-3; padding takes zeros.
    """
    g_old, g_new = old.grid, new.grid
    pos = torch.arange(new.num_tokens)
    i, j = pos // g_new.grid_w, pos % g_new.grid_w
    dy = torch.tensor([0, 1, 0, 1])
    dx = torch.tensor([0, 0, 1, 1])
    rows, cols = 2 * i[:, None] + dy, 2 * j[:, None] + dx  # N_new, 4
    inside = (rows < g_old.grid_h) & (cols < g_old.grid_w)
    source = torch.where(inside, rows * g_old.grid_w + cols, -1)
    is_patch = (pos < g_new.num_patches)[:, None]
    extra = pos - g_new.num_patches
    is_extra = ((extra >= 0) & (extra < g_new.num_extra))[:, None]
    extra_src = torch.full((new.num_tokens, 4), -1)
    extra_src[:, 0] = g_old.num_patches + extra
    source = torch.where(is_patch, source, torch.where(is_extra, extra_src, -1))
    return source.reshape(-1)
