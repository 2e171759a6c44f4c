"""Packaging for lora_layers.

Core install needs only torch and safetensors. Optional extras:
  triton  fused GPU kernels (triton, numpy)
  hf      the Phi-3 example and PEFT interop (transformers, tokenizers, tqdm, matplotlib)
  qlora   quantized frozen bases (bitsandbytes, torchao, accelerate)
  dev     everything the test suite and benchmarks need
  docs    the docs site: mkdocs build --strict (tests/test_docs_site.py runs it when installed)
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "lora_layers" / "_version.py").read_text(), re.M
).group(1)

EXTRAS = {
    "triton": ["triton>=3.0", "numpy"],
    # The example imports tqdm and matplotlib itself (progress bar, loss curve).
    "hf": ["transformers>=4.40", "tokenizers>=0.19", "tqdm", "matplotlib"],
    # transformers loads a bitsandbytes-quantized model only with a device_map, which needs accelerate.
    "qlora": ["bitsandbytes>=0.45", "torchao>=0.10", "accelerate>=1.1"],
    # mkdocs 1.6 validates anchors (mkdocs.yml turns that on); the other two bounds are the tested versions.
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.8", "mkdocstrings-python>=2.0"],
}
EXTRAS["dev"] = sorted(
    set(
        EXTRAS["triton"]
        + EXTRAS["hf"]
        + EXTRAS["qlora"]
        + [
            "pytest>=7",
            "pytest-timeout",
            "hypothesis>=6",
            "loralib==0.1.2",
            "peft>=0.13",
        ]
    )
)

setup(
    name="lora_layers",
    version=VERSION,
    description="LoRA layers for PyTorch: loralib-compatible, lean autograd, optional Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["lora_layers", "lora_layers.*"]),
    python_requires=">=3.9",
    # torch 2.4: torch.get_autocast_dtype and torch.amp.is_autocast_available, on the hot path.
    install_requires=["torch>=2.4", "safetensors>=0.4"],
    extras_require=EXTRAS,
)
