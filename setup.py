"""engram_jax: DeepSeek's Engram conditional memory in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="engram_jax",
    version="0.1.0",
    description="Engram (hashed N-gram conditional memory) for Mixture-of-Experts language models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["engram_jax", "engram_jax.*"]),
    package_data={"engram_jax": ["corpus/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorstore",
        "numpy",
        "grain>=0.2.18",
        "absl-py",
        "ml_collections",
        "tokenizers>=0.20",
        "sympy",
        "tqdm",
        "tensorboardX",
        "pyarrow",
        "matplotlib",
        "filelock",  # JAX locks its bounded persistent compilation cache with it (engram_jax/compilation.py)
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
    },
)
