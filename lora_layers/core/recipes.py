"""Tensors that can be rebuilt from tensors autograd keeps anyway.

A LoRA layer must keep its input ``x`` to compute the gradient of ``A``. Inside
a model that input is often a temporary nobody else keeps: an RMSNorm's output
(the norm keeps its *input* and ``rstd``) or the SwiGLU product ``up ⊙ silu(gate)``
(the product keeps its two factors). A producer that knows this registers
a *recipe* for its output: the kept tensors and a function that rebuilds the
output from them, with the same ops in the same order, so the rebuilt tensor is
bit-identical. :func:`lora_layers.lora_linear` looks its input up here and, if
there is a recipe, keeps the recipe's tensors instead of ``x``
(:func:`apply_rebuilding_input`).

Entries are keyed by tensor identity and die with the tensor (weak keys), so
a registered output that no LoRA layer reads costs nothing after it is freed.
An entry is ignored once the output has been modified in place.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .amp import no_autocast
from .autograd import refuse_double_backward, tracing

__all__ = ["Recipe", "register", "find", "recording", "apply_rebuilding_input"]


class Recipe(NamedTuple):
    """``rebuild(*kept)`` returns a tensor bit-identical to the registered one."""

    rebuild: Callable[..., Tensor]
    kept: Tuple[Tensor, ...]
    version: int


_RECIPES = WeakIdKeyDictionary()


def recording(source: Tensor) -> bool:
    """Whether a producer whose autograd keeps ``source`` should register a recipe now:
    grad mode is on and ``source`` requires grad (so autograd really keeps it), outside
    ``torch.compile`` and ``torch.func`` transforms."""
    return torch.is_grad_enabled() and source.requires_grad and not tracing()


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


# ----------------------------------------------------------------------------- the LoRA autograd with a rebuilt input

class _Ctx:
    """Stands in for the autograd ctx of the Function whose forward and backward
    :class:`_RebuiltInput` runs: records what it saves and the attributes it sets."""

    def __init__(self, needs_input_grad, saved_tensors=()):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = saved_tensors

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("needs_input_grad", "saved_tensors")}


class _RebuiltInput(torch.autograd.Function):
    """Runs ``inner`` (a Function whose first input is ``x`` and whose first saved
    tensor is that ``x``, e.g. ``autograd._LoRALinear``), but keeps the recipe's
    tensors instead of ``x`` and rebuilds ``x`` in backward."""

    @staticmethod
    def forward(ctx, x, inner, dt, recipe, *args):
        n = len(recipe.kept)
        kept, args = args[:n], args[n:]
        x_in = x if x.dtype == dt else x.to(dt)
        needs = (ctx.needs_input_grad[0],) + ctx.needs_input_grad[4 + n:]
        proxy = _Ctx(needs)
        out = inner.forward(proxy, x_in, *args)
        saved = proxy.saved_tensors
        if not saved or saved[0] is not x_in:
            raise RuntimeError(f"{inner.__name__} does not save its input first; it cannot rebuild it")
        ctx.save_for_backward(*kept, *saved[1:])
        ctx.inner, ctx.rebuild, ctx.n_kept, ctx.needs, ctx.state = inner, recipe.rebuild, n, needs, proxy.state()
        ctx.x_meta, ctx.dt = (x.shape, x.dtype), dt
        return out

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("lean training", "the adapter input is rebuilt without a graph; apply the adapters "
                                                "with lean=False")
        saved = ctx.saved_tensors
        kept, rest = saved[:ctx.n_kept], saved[ctx.n_kept:]
        with no_autocast(g.device.type):
            x = ctx.rebuild(*kept)
        if (x.shape, x.dtype) != ctx.x_meta:
            raise RuntimeError(f"a recipe rebuilt {tuple(x.shape)} {x.dtype}, expected {tuple(ctx.x_meta[0])} "
                               f"{ctx.x_meta[1]}")
        proxy = _Ctx(ctx.needs, (x if x.dtype == ctx.dt else x.to(ctx.dt),) + tuple(rest))
        vars(proxy).update(ctx.state)
        grads = ctx.inner.backward(proxy, g)
        dx = grads[0]
        if dx is not None and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        return (dx, None, None, None) + (None,) * ctx.n_kept + tuple(grads[1:])


def apply_rebuilding_input(recipe: Recipe, inner, x: Tensor, dt: torch.dtype, args) -> Tensor:
    """``inner.apply(x.to(dt), *args)``, keeping ``recipe.kept`` instead of ``x`` for backward."""
    return _RebuiltInput.apply(x, inner, dt, recipe, *recipe.kept, *args)
