"""Phi-3 preset: LoRA on transformers' ``Phi3ForCausalLM`` / ``Phi3Model`` in one call.

Phi-3 fuses its projections: ``self_attn.qkv_proj`` holds the rows
``[q | k | v]`` (``H·d``, ``KV·d``, ``KV·d`` with grouped-query attention) and
``mlp.gate_up_proj`` holds ``[gate | up]`` (``I``, ``I``). :func:`apply_lora`
gives each part its own adapter through :class:`~lora_layers.MergedLinear`, so
``qkv=("q", "v")`` adapts only the query and value rows, exactly as separate
``q_proj``/``v_proj`` adapters would on an unfused model.

transformers is imported only inside the functions that need it (here: none;
the model is duck-typed through its ``config`` and module names). The preset's
code is in :mod:`.preset` (``apply_lora`` and friends), lean mode in :mod:`.lean`, and
FSDP2 sharding per decoder layer in :mod:`.sharding` (``fully_shard``).
"""
from . import lean, preset, sharding  # noqa: F401  (lora_layers.phi3.lean, the old lora_layers.lean)
from .preset import *  # noqa: F401,F403  (its __all__)
from .sharding import fully_shard  # noqa: F401

__all__ = [*preset.__all__, "fully_shard"]
