"""Tensors that can be rebuilt from tensors autograd keeps anyway.

A LoRA layer must keep its input ``x`` to compute the gradient of ``A``. Inside
a model that input is often a temporary nobody else keeps: an RMSNorm's output
(the norm keeps its *input* and ``rstd``) or the SwiGLU product ``up ⊙ silu(gate)``
(the product keeps its two factors). A producer that knows this registers
a *recipe* for its output: the kept tensors and a function that rebuilds the
output from them, with the same ops in the same order, so the rebuilt tensor is
bit-identical. :func:`lora_layers.lora_linear` looks its input up here and, if
there is a recipe, keeps the recipe's tensors instead of ``x``.

Entries are keyed by tensor identity and die with the tensor (weak keys), so
a registered output that no LoRA layer reads costs nothing after it is freed.
An entry is ignored once the output has been modified in place.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Recipe", "register", "find", "recording"]


class Recipe(NamedTuple):
    """``rebuild(*kept)`` returns a tensor bit-identical to the registered one."""

    rebuild: Callable[..., Tensor]
    kept: Tuple[Tensor, ...]
    version: int


_RECIPES = WeakIdKeyDictionary()


def _transforming() -> bool:
    # torch.compile and torch.func transforms trace plain ops instead (functional._composite).
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def recording(source: Tensor) -> bool:
    """Whether a producer whose autograd keeps ``source`` should register a recipe now:
    grad mode is on and ``source`` requires grad (so autograd really keeps it), outside
    ``torch.compile`` and ``torch.func`` transforms."""
    return torch.is_grad_enabled() and source.requires_grad and not _transforming()


def register(out: Tensor, rebuild: Callable[..., Tensor], *kept: Tensor) -> None:
    """Record that ``rebuild(*kept)`` gives ``out`` again, bit for bit.

    ``kept`` must be tensors autograd keeps anyway; they are held (detached, no
    copy) until ``out`` is freed.
    """
    _RECIPES[out] = Recipe(rebuild, tuple(t.detach() for t in kept), out._version)


def find(x: Tensor) -> Optional[Recipe]:
    """The recipe registered for exactly this tensor, unless it changed since."""
    if not _RECIPES:
        return None
    recipe = _RECIPES.get(x)
    if recipe is None or recipe.version != x._version:
        return None
    return recipe
