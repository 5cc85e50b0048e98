"""attn_jax: attention mechanisms as pure JAX functions, Pallas kernels and Flax NNX stacks."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite ran with (Python 3.11, CPU).
INSTALL_REQUIRES = [
  "jax>=0.10.2",
  "jaxlib>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "grain>=0.2.18",
  "ml_collections>=1.1.0",
  "jaxtyping>=0.3.11",
  "numpy>=2.4",
  "absl-py>=2.5",
  "matplotlib>=3.11",
  "psutil>=7.2",
  "tqdm>=4.70",
  "tensorboardX>=2.6.5",
]

EXTRAS = {
  # JAX for TPU VMs; jax pins the matching libtpu itself.
  "tpu": ["jax[tpu]>=0.10.2"],
  # JAX with CUDA 12 wheels, plus the Triton bridge for GPU Pallas kernels.
  "gpu": ["jax[cuda12]>=0.10.2", "jax-triton>=0.3"],
  "test": [
    "pytest>=9.0",
    "pytest-xdist>=3.8",
    "hypothesis>=6.150",
    "ruff>=0.17",
    "beartype>=0.22",
  ],
  # PyTorch's CPU SDPA as a benchmark peer (2.13.0 is the CPU build this machine ships).
  "bench": ["torch==2.13.0"],
}

setup(
  name="attn_jax",
  version="0.1.0",
  description=__doc__,
  python_requires=">=3.11",
  packages=find_packages(include=["attn_jax", "attn_jax.*", "pallas_kernels", "pallas_kernels.*"]),
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
)
