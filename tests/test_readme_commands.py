"""Every shell command in README.md and docs/*.md works: each is extracted from the ``bash``
blocks and the inline code spans, and either RUN in a smoke form (the training commands at two
processes with ``train.steps=2``, the CP example, the export, the SLURM dry run) or checked to
parse where running is too slow (4+ processes, a cluster, the benchmarks): the script and
config exist, every override key exists (`LazyConfig.apply_overrides`), the ``train`` /
``parallel`` sections validate, and the layout fits the world (dp x cp x tp and the head
divisibility the model checks at construction). A command that no rule here covers fails the
test. A command shown on several pages is checked once (`doc_pages`). A script the docs show
whole (``# name.py: torchrun ...`` as its first line) is run by tests/test_readme_snippets.py;
here its command must be the one the script names. Inline ``key=value`` spans must name keys
of a shipped config."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.distributed.run import get_args_parser

from hyena_cp.lazy import LazyConfig, _flat_keys, instantiate
from hyena_cp.distributed.mesh import ParallelDims
from hyena_cp.train.config import ParallelConfig, TrainConfig, with_defaults
from hyena_cp.train.export import with_export_defaults
from hyena_cp.train.embed import with_embed_defaults
from hyena_cp.train.generate import with_generate_defaults
from doc_pages import PAGES, page_name, read, script_blocks
from train_helpers import CONFIGS, ROOT

# placeholders, and commands that read a user's files (a checkpoint to convert, sequences to embed, the
# output of such a conversion): only the script is checked; tests/test_convert_launch.py and
# tests/test_embeddings.py run those launchers on generated files
TEMPLATE = ("CONFIG.py", "...", "…", "[key=value", "checkpoint=", "sequences=", "converted/")
PROGRAMS = ("torchrun ", "python ", "pip ", "sbatch ", "bash ", "launch/", ". ", "DRY_RUN=")
SMOKE = ["train.steps=2", "train.warmup_steps=0", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false"]
SMOKE_TEXT = ["task.data.max_bytes=200000", "task.eval_samples=4", "task.eval_batch_size=4"]  # byte-level LMs
RUN_TIMEOUT_S = 600


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks (a span may wrap over a line end)."""
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [" ".join(s.split()) for s in spans]


def readme_commands(text: str) -> list[str]:
    """Shell commands of one page: the non-comment lines of ``bash`` blocks (split at ``&&``) and
    inline spans that start with a program and have arguments; in page order, each once."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]
    inline = inline_spans(text)
    commands = [part.strip() for line in lines for part in line.split("&&")]
    commands += [s for s in inline if s.startswith(PROGRAMS) and " " in s]
    return list(dict.fromkeys(commands))


def normalized(command: str) -> str:
    """One spelling per command: shell words without comments or extra blanks."""
    return shlex.join(shlex.split(command, comments=True))


def doc_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every command of README.md and docs/*.md, each command once (its
    first page), however it is spaced or commented."""
    seen: dict[str, tuple[str, str]] = {}
    for page in PAGES:
        for command in readme_commands(read(page)):
            seen.setdefault(normalized(command), (page_name(page), command))
    return list(seen.values())


def override_spans(text: str) -> list[str]:
    """Inline spans made only of dotted ``key=value`` overrides (``task.pack=false``)."""
    return [s for s in inline_spans(text) if all(re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=\S+", t) for t in s.split())]


def experiment_config(script: str, args: list[str]):
    """The config a launcher would run: file, defaults of its sections, the overrides."""
    config = ROOT / args[0]
    assert config.is_file(), f"{config} does not exist"
    cfg = with_defaults(LazyConfig.load(config))
    if script.endswith("generate.py"):
        with_generate_defaults(cfg)
    if script.endswith("export.py"):
        with_export_defaults(cfg)
    return LazyConfig.apply_overrides(cfg, args[1:])  # KeyError on a key the config lacks


def check_layout(cfg, world: int) -> None:
    """dp x cp x tp == world and the divisibility the models check when built on their groups
    (megatron LM: `hyena_cp.megatron`; ViT nets: `hyena_cp.models`), without building them."""
    TrainConfig(**instantiate(cfg.train))
    parallel = ParallelConfig(**instantiate(cfg.parallel))
    ParallelDims(world=world, cp=parallel.cp, tp=parallel.tp)
    block = parallel.cp * parallel.tp
    for key, divisor in (("model.hyena.num_heads", block), ("model.hidden_size", block),
                         ("model.num_attention_heads", parallel.tp), ("model.embed_dim", parallel.cp)):
        value = OmegaConf.select(cfg, key)
        if value is not None and value % divisor:
            raise ValueError(f"{key}={value} is not divisible by {divisor} (cp={parallel.cp}, tp={parallel.tp})")


def _run(argv: list[str], env: dict | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@functools.cache
def smoke_train(config: str, nproc: int, out: str) -> str:
    """Run a README training command in its smoke form (cached: the export reuses the run)."""
    cfg = LazyConfig.load(ROOT / config)
    extra = SMOKE_TEXT if "max_bytes" in cfg.task.get("data", {}) else []
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          "launch/train.py", config, *SMOKE, *extra, f"train.output_dir={out}"])
    return out


class Checker:
    """Runs or checks one command; ``run=False`` only parses (the negative tests use it)."""

    def __init__(self, tmp: Path, run: bool = True):
        self.tmp, self.run = tmp, run

    def __call__(self, command: str) -> None:
        tokens = shlex.split(command, comments=True)
        env = {}
        while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
            key, _, value = tokens.pop(0).partition("=")
            env[key] = value
        program, args = tokens[0], tokens[1:]
        if program == "python" and args[:1] == ["-m"]:
            assert args[1] in ("venv", "pytest"), command
            assert args[1] == "venv" or (ROOT / "tests").is_dir()
        elif program == ".":
            assert args == [".venv/bin/activate"], command  # made by the python -m venv before it
        elif program == "pip":
            self.pip(args)
        elif program == "torchrun":
            self.torchrun(args)
        elif program == "sbatch":
            self.sbatch(args)
        elif program == "python":
            self.launch(args[0], args[1:], world=1)
        elif program == "launch/slurm.sh":
            assert env.get("DRY_RUN") == "1" and os.access(ROOT / program, os.X_OK), command
            if any(t in args for t in TEMPLATE):  # a placeholder: the quick-start config, on the 2 ranks it needs
                args, env = ["configs/digits_hyena_tiny.py"], {**env, "NPROC_PER_NODE": "2"}
            self.slurm_dry_run(args, env)
        else:
            raise AssertionError(f"no rule in tests/test_readme_commands.py covers the command {command!r}")

    def pip(self, args: list[str]) -> None:
        assert args[0] == "install", args
        for requirement in args[1:]:
            if requirement.startswith("torch=="):  # the build CI installs, so the README is what is tested
                assert requirement in (ROOT / ".ci" / "run").read_text(), f"{requirement} differs from .ci/run"
            elif requirement == "-e":
                continue
            else:
                assert requirement == ".[test]" and '"test"' in (ROOT / "setup.py").read_text(), requirement

    def torchrun(self, args: list[str]) -> None:
        script = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        if script is not None and args[script] in SCRIPTS:  # shown whole in the docs; the snippet test runs it
            command = SCRIPTS[args[script]][0]
            assert normalized(shlex.join(["torchrun", *args])) == normalized(command), (args, command)
            return
        options = [re.sub(r"=N$", "=1", a) for a in (args if script is None else args[:script])]
        parsed = get_args_parser().parse_args([*options, "x.py"])  # unknown options raise SystemExit
        if script is not None:
            self.launch(args[script], args[script + 1:], world=int(parsed.nproc_per_node))

    def sbatch(self, args: list[str]) -> None:
        script = next(i for i, a in enumerate(args) if a.endswith(".sh"))
        options = dict(a.removeprefix("--").split("=", 1) for a in args[:script])
        world = int(options.get("nodes", 1)) * int(options.get("gpus-per-node", 1))
        assert args[script] == "launch/slurm.sh", args
        cfg = experiment_config("train.py", args[script + 1:])
        check_layout(cfg, world)
        printed = self.slurm_dry_run(args[script + 1:], {"SLURM_JOB_NUM_NODES": options.get("nodes", "1"),
                                                          "NPROC_PER_NODE": options.get("gpus-per-node", "1")})
        assert f"--nnodes={options.get('nodes', '1')}" in printed and shlex.join(args[script + 1:]) in printed

    def slurm_dry_run(self, args: list[str], env: dict) -> str:
        printed = _run(["launch/slurm.sh", *args], {"DRY_RUN": "1", **env})
        assert "launch/train.py" in printed and "torch.distributed.run" in printed, printed
        return printed

    def launch(self, script: str, args: list[str], world: int) -> None:
        assert (ROOT / script).is_file(), f"{script} does not exist"
        if any(t in a for a in args for t in TEMPLATE):
            return
        name = Path(script).name
        if name == "bench.py":
            spec_args = [str(self.tmp / "bench") if a in ("DIR", "bench_out") else a for a in args]
            _bench_parse_args()(spec_args)  # running it is tests/test_bench.py's --quick job
        elif name == "cp_example.py":
            assert not args
            if self.run:
                _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                      script])
        elif name in ("train.py", "export.py", "generate.py"):
            cfg = experiment_config(name, args)
            check_layout(cfg, world if name != "export.py" else cfg.parallel.cp * cfg.parallel.tp)
            if self.run and world <= 2 and name == "train.py" and len(args) == 1:
                smoke_train(args[0], world, str(self.tmp / Path(args[0]).stem))
            elif self.run and name == "generate.py" and world <= 2:  # generates from the smoke run
                run = smoke_train(args[0], world, str(self.tmp / Path(args[0]).stem))
                printed = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={world}", script, *args, f"train.output_dir={run}",
                                "generate.max_new_tokens=8"])
                prompt = next((a.removeprefix("generate.prompt=") for a in args if a.startswith("generate.prompt=")),
                              "")
                assert printed.startswith(prompt), printed
            elif self.run and name == "export.py" and len(args) == 1:
                cp = LazyConfig.load(ROOT / args[0]).parallel.get("cp", 1)
                run = smoke_train(args[0], cp, str(self.tmp / Path(args[0]).stem))
                printed = _run([sys.executable, script, args[0], f"train.output_dir={run}"])
                assert (Path(run) / "export" / "model.safetensors").is_file(), printed
        elif name in ("compare_runs.py", "plot_runs.py"):  # read trained runs: tests/test_compare_runs.py runs both
            assert args, f"{script} needs run folders"
        else:
            raise AssertionError(f"no rule in tests/test_readme_commands.py covers the script {script}")


@functools.cache
def _bench_parse_args():
    spec = importlib.util.spec_from_file_location("bench_launcher", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


SCRIPTS = script_blocks()
COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    return Checker(tmp_path_factory.mktemp("readme"))


def test_the_docs_have_the_commands_this_test_expects():
    commands = [c for _, c in COMMANDS]
    assert len(commands) >= 12, commands
    readme = [c for page, c in COMMANDS if page == "README.md"]
    assert any("launch/train.py configs/digits_hyena_tiny.py" in c for c in readme)
    assert any(c.startswith("sbatch") for c in commands) and any(c.startswith("DRY_RUN=1") for c in commands)
    assert "launch/bench.py --quick" in " ".join(commands)
    assert any(c.startswith("torchrun") and c.split()[-1] in SCRIPTS for c in readme), "the cp_group script's command"


@pytest.mark.parametrize("page,command", COMMANDS,
                         ids=[f"{i:02d}-{page}-{c.split()[0]}" for i, (page, c) in enumerate(COMMANDS)])
def test_doc_command(checker, page, command):
    checker(command)


def test_readme_overrides_name_keys_of_a_shipped_config():
    keys = set()
    for config in CONFIGS.glob("*.py"):
        cfg = with_embed_defaults(with_export_defaults(with_generate_defaults(with_defaults(LazyConfig.load(config)))))
        keys.update(_flat_keys(OmegaConf.to_container(cfg, resolve=False)))
    for page in PAGES:
        for span in override_spans(read(page)):
            for item in span.split():
                assert item.partition("=")[0] in keys, f"{page_name(page)}: override {item!r} names no key of configs/*.py"


@pytest.mark.parametrize("command,error", [
    ("torchrun --standalone --nproc_per_node=2 launch/train.py configs/no_such.py", "does not exist"),
    ("torchrun --standalone --nproc_per_node=2 launch/trian.py configs/lm_tiny.py", "does not exist"),
    ("torchrun --standalone --nproc_per_node=2 cp_hallo.py", "does not exist"),  # no such script shown whole
    ("torchrun --standalone --nproc_per_node=4 cp_hello.py", "cp_hello.py"),  # not the command the script names
    ("torchrun --standalone --nproc_per_node=2 launch/train.py configs/lm_tiny.py parallel.cpp=2", "no key"),
    ("torchrun --standalone --nproc_per_node=4 launch/train.py configs/lm_tiny.py parallel.cp=3", "divide"),
    # issue 12: the README's cluster command once was this (4 filter groups over cp=8)
    ("sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh configs/lm_tiny.py parallel.cp=8", "num_heads=4"),
    ("python launch/bench.py --sections nope --out DIR", "2"),
    ("make all", "no rule"),
])
def test_a_wrong_command_fails_the_check(tmp_path, command, error):
    with pytest.raises((AssertionError, KeyError, ValueError, SystemExit), match=error):
        Checker(tmp_path, run=False)(command)
