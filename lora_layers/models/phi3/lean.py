"""Lean training: activation memory below the frozen model's.

Two independent savings, both with exactly the plain model's results:

* **Recomputed adapter inputs.** An adapted projection whose input is an
  RMSNorm output (``qkv_proj``, ``gate_up_proj``) or the SwiGLU product
  (``down_proj``) keeps no copy of that input. The norm and the MLP are swapped
  to :class:`LeanRMSNorm` / :class:`LeanSwiGLUMLP` (the same object, the same
  parameters, the same ops in the same order), which register a recipe for their
  output (:mod:`lora_layers.recipes`): the norm's fp32 input and ``rstd``, or the
  two factors ``up`` and ``silu(gate)``, which their own autograd keeps anyway.
  The LoRA layer's autograd then keeps those instead of ``x`` and rebuilds ``x``
  in backward, bit for bit. The autograd graph itself is unchanged.
* **The fused loss.** With labels, the causal LM's forward computes
  :func:`~lora_layers.fused_linear_cross_entropy` on the last hidden state and
  returns ``logits=None`` (pass ``return_logits=True`` for the plain loss and the
  logits). With ``return_dict=False`` the tuple keeps transformers' positions,
  ``(loss, None, past_key_values, ...)``.

:func:`enable` installs them on a transformers Phi-3 model; :func:`disable`
(also run by :func:`~lora_layers.merge_and_unload` and :func:`~lora_layers.unload`)
gives back the plain classes and forward. State-dict keys never change.
"""
from __future__ import annotations

import inspect
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...core import recipes
from ...layers.base import LoRALayer
from ...core.loss import fused_linear_cross_entropy

__all__ = ["LeanRMSNorm", "LeanSwiGLUMLP", "LeanCausalLMForward", "enable", "disable", "is_lean"]

# Which producer feeds which projection in a Phi-3 decoder layer: producer name -> consumer name.
PHI3_PRODUCERS = {"input_layernorm": "self_attn.qkv_proj", "post_attention_layernorm": "mlp.gate_up_proj",
                  "mlp": "mlp.down_proj"}
_PLAIN_CLASS = "_lean_plain_class"  # where a swapped module remembers its own class


# ----------------------------------------------------------------------------- producers

def _rms_norm_output(h32: Tensor, rstd: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight * (h32 * rstd).to(dtype)


class LeanRMSNorm(nn.Module):
    """Phi-3's RMSNorm (``weight``, ``variance_epsilon``), same ops in the same order,
    registering a recipe for its output: its fp32 input and ``rstd``, which its
    own autograd keeps. Installed by :func:`enable` in place of ``Phi3RMSNorm``."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        dtype = hidden_states.dtype
        h32 = hidden_states.to(torch.float32)
        rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = _rms_norm_output(h32, rstd, self.weight, dtype)
        if recipes.recording(hidden_states):
            recipes.register(out, lambda h, s, w: _rms_norm_output(h, s, w, dtype), h32, rstd, self.weight)
        return out

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LeanSwiGLUMLP(nn.Module):
    """Phi-3's MLP (``gate_up_proj``, ``activation_fn``, ``down_proj``), same ops in the
    same order, registering a recipe for ``down_proj``'s input ``up * act(gate)``: its two
    factors, which the product's own autograd keeps. Installed by :func:`enable` in place
    of ``Phi3MLP``."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        up_states = self.gate_up_proj(hidden_states)
        gate, up = up_states.chunk(2, dim=-1)
        activated = self.activation_fn(gate)
        product = up * activated
        if recipes.recording(up_states):
            recipes.register(product, torch.mul, up, activated)
        return self.down_proj(product)


# ----------------------------------------------------------------------------- the fused loss in a causal LM

class LeanCausalLMForward:
    """``model.forward`` of a lean causal LM (an instance attribute set by :func:`enable`).

    With ``labels``, the loss is :func:`~lora_layers.fused_linear_cross_entropy` on the
    last hidden state and the output's ``logits`` is None. Everything else, and every
    call with ``return_logits=True``, with ``logits_to_keep``, or without labels,
    is the model's own forward. The loss follows transformers' causal-LM loss:
    labels shifted by one (or ``shift_labels``), ``ignore_index`` (default -100),
    and ``num_items_in_batch`` (sum over that count instead of the mean).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # after self
        self._positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @property
    def _plain(self):
        return type(self.model).forward.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self._plain)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params.append(inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=False))
        params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        return sig.replace(parameters=params)

    def __call__(self, *args, return_logits: bool = False, **kwargs):
        model = self.model
        if len(args) > len(self._positional):
            raise TypeError(f"forward takes at most {len(self._positional)} positional arguments, got {len(args)}")
        for name, value in zip(self._positional, args):
            if name in kwargs:
                raise TypeError(f"forward got multiple values for argument {name!r}")
            kwargs[name] = value
        head = model.get_output_embeddings()
        keep = kwargs.get("logits_to_keep", 0)
        if kwargs.get("labels") is None or return_logits or type(head) is not nn.Linear \
                or not (isinstance(keep, int) and keep == 0):
            return self._plain(**kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        outputs = model.get_decoder()(**kwargs)  # as transformers does: every other kwarg goes to the decoder
        hidden = outputs.last_hidden_state
        ignore_index = kwargs.get("ignore_index", -100)
        shifted = kwargs.get("shift_labels")
        if shifted is None:
            shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        items = kwargs.get("num_items_in_batch")
        loss = fused_linear_cross_entropy(hidden, head.weight, shifted.to(hidden.device), head.bias,
                                          ignore_index=ignore_index,
                                          reduction="mean" if items is None else "sum")
        if items is not None:
            loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        # A tuple keeps transformers' positions, (loss, logits, cache, ...): to_tuple() drops the None
        # logits, which would move the cache into the logits' place.
        return out if return_dict else (loss, None) + out.to_tuple()[1:]


# ----------------------------------------------------------------------------- install and remove

def _swap(module: nn.Module, cls: type) -> None:
    vars(module)[_PLAIN_CLASS] = type(module)
    module.__class__ = cls


def _check_class(module: nn.Module, name: str, expected: str, attrs) -> None:
    if type(module).__name__ != expected or not all(hasattr(module, a) for a in attrs):
        raise ValueError(f"{name} is a {type(module).__name__}, expected transformers' {expected} "
                         f"(with {', '.join(attrs)}); lean mode recomputes exactly its forward")


def _is_causal_lm(model: nn.Module) -> bool:
    return callable(getattr(model, "get_output_embeddings", None)) and callable(getattr(model, "get_decoder", None)) \
        and isinstance(model.get_output_embeddings(), nn.Linear)


def _plan(model: nn.Module, adapter_inputs: bool, loss: bool):
    """(module, lean class) pairs to swap, after checking every class; raises before any change."""
    swaps = []
    if adapter_inputs:
        modules = dict(model.named_modules())
        for name, module in modules.items():
            prefix, _, leaf = name.rpartition(".")
            consumer = PHI3_PRODUCERS.get(leaf)
            if consumer is None or not isinstance(modules.get(f"{prefix}.{consumer}" if prefix else consumer),
                                                  LoRALayer):
                continue
            cls, expected, attrs = ((LeanSwiGLUMLP, "Phi3MLP", ("gate_up_proj", "down_proj", "activation_fn"))
                                    if leaf == "mlp" else (LeanRMSNorm, "Phi3RMSNorm", ("weight", "variance_epsilon")))
            if type(module) is not cls:  # already lean: nothing to do
                _check_class(module, name, expected, attrs)
                swaps.append((module, cls))
    if loss and not _is_causal_lm(model):
        raise ValueError(f"loss=True needs a causal LM with an nn.Linear output head and get_decoder(), got "
                         f"{type(model).__name__}; pass loss=False (e.g. for a bare Phi3Model)")
    return swaps


def enable(model: nn.Module, *, adapter_inputs: bool = True, loss: bool = True) -> List[str]:
    """Make a (LoRA-adapted) transformers Phi-3 model lean, in place.

    Args:
        model: a ``Phi3ForCausalLM`` (or a bare ``Phi3Model`` with ``loss=False``).
        adapter_inputs: swap the RMSNorms and MLPs that feed a LoRA ``qkv_proj``,
            ``gate_up_proj`` or ``down_proj`` to their lean classes.
        loss: install :class:`LeanCausalLMForward` as ``model.forward``.

    Returns:
        The qualified names of the modules made lean (``""`` for the model's forward).

    Raises:
        ValueError: a producer is not transformers' ``Phi3RMSNorm``/``Phi3MLP``, or
            ``loss=True`` on a model without an ``nn.Linear`` output head. Nothing
            is changed then.
    """
    swaps = _plan(model, adapter_inputs, loss)
    names = {id(m): n for n, m in model.named_modules()}
    done = []
    for module, cls in swaps:
        _swap(module, cls)
        done.append(names[id(module)])
    if loss and not isinstance(vars(model).get("forward"), LeanCausalLMForward):
        model.forward = LeanCausalLMForward(model)
        done.append("")
    return done


def disable(model: nn.Module) -> None:
    """Undo :func:`enable`: the plain classes and the model's own forward again."""
    for module in model.modules():
        plain = vars(module).pop(_PLAIN_CLASS, None)
        if plain is not None:
            module.__class__ = plain
        if isinstance(vars(module).get("forward"), LeanCausalLMForward):
            del module.forward


def is_lean(model: nn.Module) -> bool:
    """Whether :func:`enable` changed anything in ``model`` (and :func:`disable` has not undone it)."""
    return any(_PLAIN_CLASS in vars(m) or isinstance(vars(m).get("forward"), LeanCausalLMForward)
               for m in model.modules())
