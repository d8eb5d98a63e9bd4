"""scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package) as an
image-classification set large enough to shard rows under context parallelism."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageSplits", "load_digits_splits"]


@dataclass(frozen=True)
class ImageSplits:
    """GLOBAL train/validation tensors (every rank holds all of them; they are small).

    ``*_images``: ``[N, 1, img_size, img_size]`` float32, normalised with the training
    mean/std; ``*_labels``: ``[N]`` int64 in ``[0, num_classes)``.
    """

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    num_classes: int


def load_digits_splits(*, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
    """Digits upsampled bilinearly from 8x8 to ``img_size`` x ``img_size``, stratified split.

    The split depends only on ``seed`` (not on the parallel layout), so every run with the
    same seed validates on the same images.
    """
    from sklearn.datasets import load_digits  # scikit-learn is only needed by this data set

    if img_size < 8:
        raise ValueError(f"img_size={img_size} must be >= 8 (the digits are 8x8)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # N, 1, 8, 8 in [0, 1]
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return ImageSplits(images[train_idx].contiguous(), labels[train_idx], images[val_idx].contiguous(),
                       labels[val_idx], num_classes=int(labels.max()) + 1)


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Per class, a seeded permutation; the first ``round(n * val_fraction)`` go to validation."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
