"""Install megacpt: `pip install -e .[dev]` (install a torch build for your machine first)."""
import sys

from setuptools import find_packages, setup

# megatron-core 0.16.x is the last release that supports Python 3.11; newer Pythons may take newer ones.
MEGATRON_CORE = "megatron-core>=0.16,<0.17" if sys.version_info < (3, 12) else "megatron-core>=0.16"

setup(
    name="megacpt",
    version="0.1.0",
    description="Continual pretraining of GPT-NeoX models: megatron-core model, DeepSpeed engine, CPT policy",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megacpt", "megacpt.*"]),
    install_requires=[
        "torch>=2.4",
        MEGATRON_CORE,
        "deepspeed>=0.19,<0.20",
        "sentencepiece>=0.2",
        "numpy",
        "scipy",
        "pydantic>=2",
    ],
    extras_require={
        "hf": ["transformers>=4.45", "tokenizers", "safetensors"],
        "viz": ["matplotlib"],
        "tb": ["tensorboard"],
        "eval": ["lm-eval>=0.4.13,<0.5"],
        "dev": [
            "pytest",
            "pytest-timeout",  # a hung test fails with its stack instead of stalling the whole run
            "transformers>=4.45",
            "tokenizers",
            "safetensors",
            "matplotlib",
            "tensorboard",
            "zstandard",
            "lm-eval>=0.4.13,<0.5", "accelerate",  # lm-eval's `hf` model (the adapter's reference) needs accelerate
        ],
    },
    entry_points={"console_scripts": ["megacpt=megacpt.cli:main"]},
)
