"""Spatial recall on an N-D canvas, with scikit-learn's handwritten digits as glyphs (embedded,
nothing downloaded): find the one digit somewhere on a 2-D canvas ``[H, W]`` or in a 3-D volume
``[T, H, W]`` and copy it into a fixed corner.

- Input ``[*S, 2]`` (channels last): channel 0 holds the canvas — zeros (plus optional Gaussian
  noise) and the glyph, a ``g x g`` digit in [0, 1] with its top-left corner at a random position
  (in 3-D: a random frame, a random place in it); channel 1 marks the glyph's ``g x g`` box with
  ones. The mark makes the task well posed: many 8x8 digits have blank rows or columns at their
  border, so the pixels alone do not say where the box to copy starts.
- Target ``[*S, 1]``: zeros, and the same glyph at the fixed readout box — the top-left ``g x g``
  corner (in 3-D: of frame 0). A glyph is never placed over the readout box, so the input there is
  empty (or noise) and the copy must come from far away: up to ``S - g`` along every axis.

The glyphs of the training and validation samples are disjoint digit images (a stratified
split of the 1,797 digits, `hyena_cp.data.digits`). Samples are described by a few integers
(which glyph, where) drawn once from the seed, and rendered on demand, so a split of any length
costs nothing to hold; the noise of sample ``i`` comes from its own generator, so a sample is
the same whatever batch it is rendered in.

``placement="fixed"`` puts every glyph at the far corner instead (rows and columns ``S - g``, the
last frame):
the variant nvSubquadratic's EMNIST "simple copy" recall trains (a fixed long-range copy).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hyena_cp.data.digits import _stratified_split

__all__ = ["RecallSplit", "SpatialRecallData", "make_spatial_recall"]

PLACEMENTS = ("random", "fixed")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class RecallSplit:
    """One split: its glyphs and, per sample, which glyph and where (top-left corner, one
    coordinate per spatial axis; in 3-D ``(frame, row, col)``)."""

    glyphs: Tensor  # N_glyphs, g, g float32 in [0, 1]
    labels: Tensor  # N_glyphs int64 digit class
    image_index: Tensor  # N_glyphs int64: which of scikit-learn's 1,797 digit images each glyph is
    glyph_index: Tensor  # N int64
    position: Tensor  # N, D int64
    noise_seed: int

    def __len__(self) -> int:
        return len(self.glyph_index)


@dataclass(frozen=True)
class SpatialRecallData:
    """GLOBAL samples of the task (every rank holds the same description and renders the batches
    it needs). ``size``: the canvas ``(H, W)`` or volume ``(T, H, W)``; ``glyph_size``: g."""

    size: tuple[int, ...]
    glyph_size: int
    noise_std: float
    train: RecallSplit
    val: RecallSplit
    templates: Tensor  # 10, g, g: mean training glyph of each class

    in_channels = 2  # canvas, glyph mark
    out_channels = 1

    def split(self, name: str) -> RecallSplit:
        if name not in SPLITS:
            raise ValueError(f"split={name!r} must be one of {SPLITS}")
        return self.train if name == "train" else self.val

    def readout(self) -> tuple[slice, ...]:
        """Index of the readout box in a ``[*S]`` grid: the top-left g x g corner (of frame 0)."""
        g, frames = self.glyph_size, (slice(0, 1),) if len(self.size) == 3 else ()
        return (*frames, slice(0, g), slice(0, g))

    def readout_mask(self) -> Tensor:
        """``[*S]`` bool, True on the readout box."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[self.readout()] = True
        return mask

    def template_canvases(self) -> Tensor:
        """``[10, *S]``: each class template where a perfect copy would put it (zeros elsewhere)."""
        out = torch.zeros(len(self.templates), *self.size)
        out[(slice(None), *self.readout())] = self.templates.view(len(self.templates), *[1] * (len(self.size) - 2),
                                                                    self.glyph_size, self.glyph_size)
        return out

    def template_accuracy(self, name: str = "val") -> float:
        """How often the nearest class template (L2) of a split's TRUE glyph is its class: the
        ceiling of the recall accuracy (a perfect copy scores this, not 100 %)."""
        part = self.split(name)
        glyphs = part.glyphs[part.glyph_index].flatten(1)  # N, g*g
        nearest = torch.cdist(glyphs, self.templates.flatten(1)).argmin(1)
        return float((nearest == part.labels[part.glyph_index]).double().mean())

    def labels(self, name: str, indices: Tensor) -> Tensor:
        """Digit class of the samples ``indices`` of split ``name``."""
        part = self.split(name)
        return part.labels[part.glyph_index[indices]]

    def render(self, name: str, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs [n, *S, 2], targets [n, *S, 1])`` float32 of the samples ``indices`` (full grids)."""
        part, g = self.split(name), self.glyph_size
        n = len(indices)
        inputs = torch.zeros(n, *self.size, 2)
        targets = torch.zeros(n, *self.size, 1)
        for row, i in enumerate(indices.tolist()):
            glyph = part.glyphs[part.glyph_index[i]]
            box = tuple(slice(p, p + g) for p in part.position[i, -2:].tolist())
            frame = tuple(part.position[i, :-2].tolist())  # (t,) in 3-D, () in 2-D
            inputs[(row, *frame, *box, 0)] = glyph
            inputs[(row, *frame, *box, 1)] = 1.0
            targets[(row, *self.readout(), 0)] = glyph
            if self.noise_std > 0:
                gen = torch.Generator().manual_seed(part.noise_seed + i)
                inputs[row, ..., 0] += self.noise_std * torch.randn(self.size, generator=gen)
        return inputs, targets


def _positions(size: Sequence[int], g: int, placement: str) -> Tensor:
    """All allowed top-left corners ``[M, D]``: the glyph fits and does not touch the readout box."""
    if placement == "fixed":  # the far corner (of the last frame)
        return torch.tensor([[*[s - 1 for s in size[:-2]], *[s - g for s in size[-2:]]]])
    grids = torch.meshgrid(*[torch.arange(s - g + 1) if a >= len(size) - 2 else torch.arange(s)
                             for a, s in enumerate(size)], indexing="ij")
    corners = torch.stack([t.flatten() for t in grids], dim=1)  # M, D
    in_readout = (corners[:, -2:] < g).all(1)
    if len(size) == 3:
        in_readout &= corners[:, 0] == 0
    return corners[~in_readout]


def _split(glyphs: Tensor, labels: Tensor, idx: Tensor, num: int, corners: Tensor, gen: torch.Generator,
           noise_seed: int) -> RecallSplit:
    which = torch.randint(len(idx), (num,), generator=gen)
    where = corners[torch.randint(len(corners), (num,), generator=gen)]
    return RecallSplit(glyphs[idx].contiguous(), labels[idx], idx, which, where, noise_seed)


def make_spatial_recall(*, size: Sequence[int], glyph_size: int = 8, num_train: int = 20000, num_val: int = 512,
                        noise_std: float = 0.0, placement: str = "random", val_fraction: float = 0.2,
                        seed: int = 0) -> SpatialRecallData:
    """The task's train and validation samples (see module docstring).

    Args:
        size: canvas ``(H, W)`` or volume ``(T, H, W)``; every spatial side of a frame must fit
            two glyphs (the readout box and the glyph beside it).
        glyph_size: side g of a glyph: the 8x8 digits, upsampled bilinearly when g > 8.
        num_train, num_val: samples per split (glyphs are reused with other positions).
        noise_std: Gaussian noise added to the canvas channel of the input (not to the target).
        placement: "random" (the task) or "fixed" (every glyph at the far corner).
        val_fraction: share of the digit images kept for validation glyphs.
        seed: glyph split, sample draws and noise all follow from it.
    """
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3):
        raise ValueError(f"size={size} must be a canvas (H, W) or a volume (T, H, W)")
    if glyph_size < 8:
        raise ValueError(f"glyph_size={glyph_size} must be >= 8 (the digits are 8x8)")
    if min(size[-2:]) < 2 * glyph_size:
        raise ValueError(f"size={size}: H and W must be >= 2 * glyph_size = {2 * glyph_size} (the readout box and a "
                         f"glyph beside it); use a larger canvas or a smaller glyph_size")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} must be one of {PLACEMENTS}")
    if num_train < 1 or num_val < 1 or noise_std < 0:
        raise ValueError(f"num_train={num_train}, num_val={num_val} must be >= 1 and noise_std={noise_std} >= 0")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    from sklearn.datasets import load_digits  # scikit-learn is only needed by this data set

    digits = load_digits()
    glyphs = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # N, 1, 8, 8 in [0, 1]
    if glyph_size != 8:
        glyphs = F.interpolate(glyphs, size=(glyph_size, glyph_size), mode="bilinear", align_corners=False)
    glyphs, labels = glyphs.squeeze(1).clamp(0.0, 1.0), torch.from_numpy(digits.target).long()
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    gen = torch.Generator().manual_seed(seed)
    corners = _positions(size, glyph_size, placement)
    train = _split(glyphs, labels, train_idx, num_train, corners, gen, noise_seed=seed * 10**7)
    val = _split(glyphs, labels, val_idx, num_val, corners, gen, noise_seed=seed * 10**7 + 5 * 10**6)
    templates = torch.stack([train.glyphs[train.labels == c].mean(0) for c in range(10)])
    return SpatialRecallData(size, glyph_size, float(noise_std), train, val, templates)
