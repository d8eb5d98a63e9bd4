"""Convert an Evo 2 (vortex) or HyenaDNA (HuggingFace) checkpoint into a hyena_cp model folder.

    python launch/convert.py evo2 config=evo2-7b-1m.yml checkpoint=evo2_7b.pt out=converted/evo2_7b
    python launch/convert.py hyenadna config=config.json checkpoint=model.safetensors out=converted/hdna [shift=0.05]

Optional: ``dtype=float32|bfloat16|float64`` (of the written weights and the model; default float32),
``seq_len=N`` (the fine-tuning sequence length in train.yaml). Writes ``model.safetensors``,
``model.yaml`` and ``train.yaml`` (`hyena_cp.interop.files`); then fine-tune at any layout with

    torchrun --standalone --nproc_per_node=2 launch/train.py converted/evo2_7b/train.yaml parallel.cp=2

One process, no torch.distributed: the conversion is a pure mapping (`hyena_cp.interop.evo2`,
`hyena_cp.interop.hyenadna`); the model loads the tensors strictly when it is built.
"""
from __future__ import annotations

import sys

from hyena_cp.distributed import exit_process
from hyena_cp.interop import evo2, hyenadna
from hyena_cp.interop.files import DTYPES, finetune_config, read_config, read_state_dict, write_converted
from hyena_cp.train.cli import run_launcher

USAGE = ("usage: python launch/convert.py {evo2,hyenadna} config=PATH checkpoint=PATH out=DIR "
         "[dtype=float32|bfloat16|float64] [seq_len=N] [shift=0.05 (hyenadna)]")
KINDS = {"evo2": (evo2.convert, "bytes"), "hyenadna": (hyenadna.convert, "nucleotides")}
REQUIRED, OPTIONAL = {"config", "checkpoint", "out"}, {"dtype", "seq_len", "shift"}


def parse(argv: list[str]) -> tuple[str, dict[str, str]] | None:
    if not argv or argv[0] not in KINDS or any("=" not in a for a in argv[1:]):
        return None
    args = dict(a.split("=", 1) for a in argv[1:])
    if not REQUIRED <= args.keys() <= REQUIRED | OPTIONAL or ("shift" in args and argv[0] != "hyenadna"):
        return None
    if args.get("dtype", "float32") not in DTYPES:
        return None
    return argv[0], args


def main(argv: list[str] | None = None) -> int:
    parsed = parse(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    kind, args = parsed
    convert, alphabet = KINDS[kind]
    extra = {"shift": float(args["shift"])} if "shift" in args else {}
    cfg, state = convert(read_config(args["config"]), read_state_dict(args["checkpoint"]), **extra)
    dtype = DTYPES[args.get("dtype", "float32")]
    out = write_converted(cfg, state, args["out"], dtype)
    train_yaml = finetune_config(cfg, out, alphabet, dtype, int(args["seq_len"]) if "seq_len" in args else None)
    print(f"wrote {out / 'model.safetensors'} ({len(state)} tensors), {out / 'model.yaml'} and {train_yaml}", flush=True)
    return 0


if __name__ == "__main__":
    exit_process(run_launcher(main))
