"""Fixture derived config: loads base.py relative to this file and edits fields."""
from hyena_cp.lazy import LazyConfig

_base = LazyConfig.load_rel("base.py")
model, train = _base.model, _base.train
model._args_[2].out_features = 3
train.steps = 20
head = LazyConfig.load_rel("base.py", "model")
head._args_[0].in_features = 5
