"""The spatial-recall data (`hyena_cp.data.spatial_recall`) and its task's metrics
(`hyena_cp.train.spatial_tasks`): shapes, seeds, that the target is the glyph of the input copied
into the readout box, disjoint train/validation digits; and an oracle network scores a perfect copy
(zero readout error, the template ceiling) under CP and DP, while a network that copies another
sample's glyph does not."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hyena_cp.data.spatial_recall import make_spatial_recall
from hyena_cp.parallel import group_rank, group_size, shard
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.spatial_tasks import SpatialRecallTask

SIZES = {"2d": (32, 40), "3d": (4, 16, 20)}


@pytest.fixture(scope="module", params=sorted(SIZES))
def data(request):
    return make_spatial_recall(size=SIZES[request.param], glyph_size=8, num_train=64, num_val=32, noise_std=0.1)


def glyph_boxes(inputs: torch.Tensor) -> list[tuple[slice, ...]]:
    """Where the mark channel says each sample's glyph is (independent of the generator's bookkeeping)."""
    boxes = []
    for mark in inputs[..., 1]:
        where = mark.nonzero()
        lo, hi = where.min(0).values, where.max(0).values + 1
        boxes.append(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
    return boxes


def test_shapes_and_the_target_is_the_copied_glyph(data):
    inputs, targets = data.render("train", torch.arange(10))
    assert inputs.shape == (10, *data.size, 2) and targets.shape == (10, *data.size, 1)
    readout = data.readout_mask()
    assert int(readout.sum()) == 64 and readout[data.readout()].all()
    for x, y, box in zip(inputs, targets, glyph_boxes(inputs)):
        assert [s.stop - s.start for s in box[-2:]] == [8, 8] and (len(box) == 2 or box[0].stop - box[0].start == 1)
        assert not (x[..., 1].bool() & readout).any(), "a glyph must not cover the readout box"
        glyph = y[..., 0][data.readout()].reshape(8, 8)
        assert glyph.max() > 0.5 and (y[..., 0][~readout] == 0).all(), "target: the glyph in the box, zeros elsewhere"
        noise = x[..., 0].clone()
        noise[box] -= glyph.view(noise[box].shape)  # what is left of the canvas is the noise only
        assert 0.05 < noise.std() < 0.15 and (y[..., 0] == y[..., 0].clamp(0, 1)).all()


def test_seeds_and_batch_independence():
    size = SIZES["3d"]
    a = make_spatial_recall(size=size, num_train=16, num_val=8, noise_std=0.1, seed=3)
    b = make_spatial_recall(size=size, num_train=16, num_val=8, noise_std=0.1, seed=3)
    c = make_spatial_recall(size=size, num_train=16, num_val=8, noise_std=0.1, seed=4)
    for x, y in zip(a.render("val", torch.arange(8)), b.render("val", torch.arange(8))):
        assert torch.equal(x, y)
    assert not torch.equal(a.render("val", torch.arange(8))[0], c.render("val", torch.arange(8))[0])
    one = a.render("train", torch.tensor([5]))[0]
    assert torch.equal(a.render("train", torch.tensor([2, 5, 9]))[0][1], one[0]), "a sample is the same in any batch"


def test_train_and_validation_glyphs_are_different_digit_images(data):
    assert not set(data.train.image_index.tolist()) & set(data.val.image_index.tolist())
    assert len(data.train.image_index) + len(data.val.image_index) == 1797
    assert 0.85 < data.template_accuracy("val") < 0.97  # the recall accuracy a perfect copy gets


def test_fixed_placement_and_bad_arguments():
    fixed = make_spatial_recall(size=(4, 16, 16), num_train=8, num_val=4, placement="fixed")
    assert fixed.train.position.tolist() == [[3, 8, 8]] * 8
    for kwargs, match in [(dict(size=(15, 16)), "H and W must be >= 2 \\* glyph_size = 16"),
                          (dict(size=(16,)), "must be a canvas"), (dict(size=(16, 16), glyph_size=6), ">= 8"),
                          (dict(size=(16, 16), placement="corner"), "placement='corner' must be one of")]:
        with pytest.raises(ValueError, match=match):
            make_spatial_recall(**kwargs)


class Oracle(nn.Module):
    """Copies the marked glyph into the readout box (``shift``: of another sample of the batch)."""

    def __init__(self, data, shift: int = 0):
        super().__init__()
        self.data, self.shift, self.scale = data, shift, nn.Parameter(torch.ones(()))

    def local_part(self, t, cp_group=None):
        return shard(t, 1, "rows", group_size(cp_group), group_rank(cp_group))

    def forward(self, x, *, cp_group=None):
        out = torch.zeros(*x.shape[:-1], 1)
        boxes = glyph_boxes(x)
        for row in range(len(x)):
            source = (row + self.shift) % len(x)
            glyph = x[(source, *boxes[source], 0)]
            out[(row, *self.data.readout(), 0)] = glyph.reshape(out[(row, *self.data.readout(), 0)].shape)
        return self.local_part(out * self.scale, cp_group)


def _evaluate(data, cp: int, shift: int) -> dict:
    groups = init_parallel(cp)
    try:
        task = SpatialRecallTask(data=data, global_batch_size=4, eval_batch_size=5, groups=groups, seed=0)
        return task.evaluate(Oracle(data, shift))
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("world,cp", [(1, 1), (2, 2), (2, 1)], ids=["one", "cp2", "dp2"])
def test_metrics_of_a_perfect_and_a_wrong_copy(dist_run, world, cp):
    data = make_spatial_recall(size=(4, 16, 16), num_train=8, num_val=23, noise_std=0.0)
    perfect = dist_run(_evaluate, world, data, cp, 0)
    assert all(r == perfect[0] for r in perfect)
    assert perfect[0]["val_loss"] == 0 and perfect[0]["val_readout_mse"] == 0
    assert perfect[0]["val_recall_acc"] == pytest.approx(data.template_accuracy("val"), abs=1e-12)
    wrong = dist_run(_evaluate, world, data, cp, 1)[0]  # shift 1: another sample's glyph
    assert wrong["val_readout_mse"] > 0.02 and wrong["val_recall_acc"] < 0.5
    assert wrong["val_loss"] == pytest.approx(wrong["val_readout_mse"] * 64 / (4 * 16 * 16))
