"""hyena_cp: context-parallel Hyena over 1, 2 or 3 axes (causal, linear or circular each) with exact-adjoint backward."""
from setuptools import find_packages, setup

setup(
    name="hyena_cp",
    version="0.1.0",
    license="Apache-2.0",
    description="Context-parallel Hyena operators, ViT-5 Hyena models and megatron-core integration",
    packages=find_packages(include=["hyena_cp", "hyena_cp.*"]),
    python_requires=">=3.10",
    # torch is listed without a pin so an installed CPU/CUDA build is kept; install
    # torch first (see README) or pip may resolve a multi-GB CUDA build.
    install_requires=[
        # 2.10: FSDP2's replicate (torch.distributed._composable.replicate_with_fsdp, its 1-D
        # mesh form and ReplicateModule, late 2025), behind parallel.dp_mode="ddp"; 2.6 for the
        # group-relative peers (group_peer=, group_src=, group_dst=) and FSDP2's public path.
        # Every torch.distributed API used, with the release it needs: tests/test_torch_floor.py
        # (it checks them on the installed torch; CI tests 2.13 only).
        "torch>=2.10",
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
    extras_require={
        # psutil: megatron-core's dist_checkpointing writer imports it (tests/test_megatron_dist_checkpoint.py)
        "test": ["pytest>=8", "psutil"],
        # Optional CUDA kernels, used at run time when installed (hyena_cp/ops/kernels.py); take the
        # extra of torch's CUDA major version, with --no-build-isolation (causal-conv1d builds
        # against the installed torch when no prebuilt wheel matches it).
        "gpu-cu12": ["causal-conv1d>=1.2", "subquadratic-ops-torch-cu12"],
        "gpu-cu13": ["causal-conv1d>=1.2", "subquadratic-ops-torch-cu13"],
    },
)
