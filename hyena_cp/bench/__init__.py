"""Benchmarks behind ``launch/bench.py``: one module per section, each with
``run(ctx: BenchContext) -> Section``; `report` writes the Markdown tables and PNG plots.

Sections: ``comm`` (bytes per rank vs the floor), ``memory`` (activation memory per rank),
``scaling`` (Hyena vs attention), ``cp`` (CP efficiency on CPU), ``lm`` (language-model
quality of Hyena, attention and hybrid stacks), ``packing`` (packed documents vs one sequence),
``gen`` (cached decoding vs recompute, cache bytes per CP rank), ``sharding`` (parameter,
gradient and AdamW bytes per rank, FSDP2 vs replicated), ``speed`` (eager vs compiled, fp32 vs
bf16, against SDPA and a reference Hyena layer written from the paper), ``striped`` (StripedHyena 2
and HyenaDNA operators: layer speed, decoding with fixed-size states, embedding throughput under CP,
memory of a 1B-shaped Evo 2 at 1M tokens), ``nvsub`` (our 2-D layer against nvSubquadratic's at a
matched function, when it is installed), ``gpu`` (one GPU, skipped without CUDA). Multi-rank sections run on gloo groups that `ranks.RankPools` forks.
"""
from __future__ import annotations

from hyena_cp.bench import (comm, cp_efficiency, generation, gpu, lm_quality, memory, packing, peer, scaling, sharding,
                            speed, striped)
from hyena_cp.bench.common import BenchContext, Section, Table

SECTIONS = {"comm": comm.run, "memory": memory.run, "scaling": scaling.run, "cp": cp_efficiency.run, "lm": lm_quality.run,
            "packing": packing.run, "gen": generation.run, "sharding": sharding.run, "speed": speed.run,
            "striped": striped.run, "nvsub": peer.run, "gpu": gpu.run}

__all__ = ["SECTIONS", "BenchContext", "Section", "Table"]
