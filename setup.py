"""hyena_cp: context-parallel Hyena (1-D causal and 2-D) with exact-adjoint backward."""
from setuptools import find_packages, setup

setup(
    name="hyena_cp",
    version="0.1.0",
    description="Context-parallel Hyena operators, ViT-5 Hyena models and megatron-core integration",
    packages=find_packages(include=["hyena_cp", "hyena_cp.*"]),
    python_requires=">=3.10",
    # torch is listed without a pin so an installed CPU/CUDA build is kept; install
    # torch first (see README) or pip may resolve a multi-GB CUDA build.
    install_requires=[
        # 2.6: the group-relative peer arguments of send/recv/broadcast/reduce (group_peer=,
        # group_src=, group_dst=) used in hyena_cp/parallel/; CI tests 2.13.
        "torch>=2.6",
        "megatron-core>=0.16",
        "einops>=0.7",
        "omegaconf>=2.3",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "numpy",
        "pyyaml",
        "safetensors>=0.4",  # weights-only model export (hyena_cp/train/export.py): no pickle on load
    ],
    extras_require={"test": ["pytest>=8"]},
)
