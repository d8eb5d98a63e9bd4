"""The trainer's speed keys (`hyena_cp.train.config.TrainConfig`), on the tiny digits config:

- ``train.precision=bf16`` (autocast) at CP=2 trains close to the fp32 single-process run and
  differs from it bitwise (bf16 did run); parameters and checkpoints stay fp32;
- ``train.compile=true`` (backend "aot_eager": AOTAutograd traces forward and backward, no
  codegen, so CI pays seconds, not inductor's C++ builds) at CP=2 gives the parameters of the
  eager CP=2 run after 2 steps in float64, and its checkpoints hold the same keys;
- the config checks: bf16 autocast together with FSDP2's bf16 policy, an unknown precision or
  backend raise before any step.
"""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch
import torch.utils._python_dispatch

from hyena_cp.train.config import ParallelConfig, TrainConfig, check_sections
from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.loop import compile_blocks
from references import rel_err
from train_helpers import VISION, load_config, run_config, run_config_fp64

OVERRIDES = VISION + ["model.mixers=hyena", "train.clip_grad_norm=0.5", "train.log_every=1"]
# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); the losses of a one-block net
# pass through a handful of bf16 roundings, so they agree with fp32 to ~1e-2 relative
BF16_RTOL = 1e-2
# AdamW moves each weight by <= ~lr per step whatever the gradient's size, so a bf16-perturbed
# gradient of a near-zero component may move it the other way: at most 2 * lr * steps apart
LR, STEPS = 2e-3, 3
TOL_FP64 = 1e-10  # compiled vs eager in float64: the same math, other kernels (decompositions)


def _final_params(run: dict, out) -> dict[str, torch.Tensor]:
    return load_model_state(out / "checkpoints" / f"step_{run['step']:08d}")


def test_bf16_autocast_at_cp2_trains_close_to_fp32_single_process(dist_run, tmp_path):
    fp32 = dist_run(run_config, 1, "digits_hyena_tiny.py", OVERRIDES + ["parallel.cp=1"], str(tmp_path / "fp32"))[0]
    bf16s = dist_run(run_config, 2, "digits_hyena_tiny.py", OVERRIDES + ["parallel.cp=2", "train.precision=bf16"],
                     str(tmp_path / "bf16"))
    bf16 = bf16s[0]
    assert bf16["losses"] == bf16s[1]["losses"] and len(bf16["losses"]) == STEPS
    assert bf16["losses"] != fp32["losses"]  # autocast did run (fp32 CP=2 matches to ~1e-7)
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(bf16[key]), torch.tensor(fp32[key]), rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(bf16["final"]["val_loss"], fp32["final"]["val_loss"], rtol=BF16_RTOL, atol=0)
    p32, p16 = _final_params(fp32, tmp_path / "fp32"), _final_params(bf16, tmp_path / "bf16")
    print(f"bf16 cp2 vs fp32: losses {rel_err(torch.tensor(bf16['losses']), torch.tensor(fp32['losses'])):.1e} "
          f"relative, parameters {max(float((p16[k] - v).abs().max()) for k, v in p32.items()):.1e} absolute")
    assert p16.keys() == p32.keys() and all(v.dtype == torch.float32 for v in p16.values())
    for name, ref in p32.items():
        torch.testing.assert_close(p16[name], ref, rtol=0, atol=2 * LR * STEPS, msg=name)


def test_compiled_blocks_at_cp2_give_the_eager_parameters(dist_run, tmp_path):
    extra = ["parallel.cp=2", "train.steps=2"]
    eager = dist_run(run_config_fp64, 2, "digits_hyena_tiny.py", OVERRIDES + extra, str(tmp_path / "eager"))[0]
    compiled = dist_run(run_config_fp64, 2, "digits_hyena_tiny.py",
                        OVERRIDES + extra + ["train.compile=true", "train.compile_backend=aot_eager"],
                        str(tmp_path / "compiled"))[0]
    reference, params = _final_params(eager, tmp_path / "eager"), _final_params(compiled, tmp_path / "compiled")
    assert params.keys() == reference.keys()  # module.compile() in place: no "_orig_mod." in the names
    errors = {name: rel_err(params[name], ref) for name, ref in reference.items()}
    errors["losses"] = rel_err(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]))
    print(f"compiled vs eager, cp2, fp64: worst relative error {max(errors.values()):.1e}")
    assert max(errors.values()) < TOL_FP64, max(errors.items(), key=lambda kv: kv[1])


def test_compile_blocks_keeps_the_state_dict_keys(tmp_path):
    from hyena_cp.lazy import instantiate

    model = instantiate(load_config("digits_hyena_tiny.py", OVERRIDES, str(tmp_path)).model)
    keys = list(model.state_dict())
    compile_blocks(model, "aot_eager")
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="train.compile_backend='inductr'"):
        compile_blocks(model, "inductr")


def test_precision_keys_are_checked():
    check_sections(TrainConfig(steps=1, precision="bf16"), ParallelConfig())
    with pytest.raises(ValueError, match="choose one"):
        check_sections(TrainConfig(steps=1, precision="bf16"), ParallelConfig(mixed_precision="bf16"))
    with pytest.raises(ValueError, match="train.precision='fp16'"):
        TrainConfig(steps=1, precision="fp16")
    with pytest.raises(ValueError, match="train.compile"):
        TrainConfig(steps=1, compile="yes")
    with pytest.raises(TypeError, match="compile_backnd"):
        TrainConfig(steps=1, compile_backnd="aot_eager")


class _DtypesOf(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every FFT and matmul the forward dispatches."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "fft" in name or name in ("addmm", "mm", "bmm"):
            self.seen.setdefault(name, set()).update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_the_ffts_stay_float32(tmp_path):
    from hyena_cp.lazy import instantiate
    from hyena_cp.train.config import PRECISIONS

    model = instantiate(load_config("digits_hyena_tiny.py", OVERRIDES, str(tmp_path)).model)
    with torch.autocast("cpu", dtype=PRECISIONS["bf16"]), _DtypesOf() as record:
        model(torch.randn(2, 1, 16, 16))
    ffts = {k: v for k, v in record.seen.items() if "fft" in k}
    assert ffts and all(v <= {torch.float32, torch.complex64} for v in ffts.values()), record.seen
    # the projections do run in bf16; the filter MLP's addmm stays fp32 (Hyena.build_filter)
    assert record.seen["addmm"] == {torch.bfloat16, torch.float32}


def test_bf16_autocast_of_a_megatron_model_on_cpu_is_refused(dist_run, tmp_path):
    from train_helpers import LM

    (error,) = dist_run(run_config, 1, "lm_tiny.py", LM + ["parallel.cp=1", "train.precision=bf16"], str(tmp_path),
                        expect_error=ValueError)
    assert "needs CUDA" in str(error)
