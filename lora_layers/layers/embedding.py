"""``Embedding``: ``nn.Embedding`` with a LoRA adapter (loralib's init and no dropout)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from ..core.functional import lora_embedding
from ..core.merging import accumulation_dtype
from ..core.mixed import MixedAdapter, lora_embedding_mixed, token_adapters
from ..core.spec import NOT_GIVEN, LoRASpec, check_dora_support
from .base import LoRALayer

__all__ = ["Embedding"]


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` with a LoRA adapter: ``y = W[x] + scaling · Aᵀ[x] Bᵀ``.

    Args:
        num_embeddings, embedding_dim, **kwargs: as ``nn.Embedding``.
        r, lora_alpha, merge_weights, use_rslora, lora_dtype: as :class:`Linear` (no dropout, as in loralib).

    Attributes:
        lora_A: ``(r, num_embeddings)``, zero init.
        lora_B: ``(embedding_dim, r)``, normal init.

    Unlike loralib, ``max_norm`` is not applied to the adapter lookup (it would
    renormalise ``lora_A`` in place).
    """

    _base_type = nn.Embedding
    _adapter_dropout = False

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, *, use_rslora: bool = False, lora_dtype=None, init: str = "kaiming",
                 use_dora: bool = False, **kwargs):
        spec = LoRASpec(r, lora_alpha, 0.0, merge_weights, use_rslora, lora_dtype, use_dora=use_dora, init=init)
        check_dora_support(self, spec.use_dora, spec.r > 0)  # a clear TypeError: DoRA is Linear's
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(spec)
        self.reset_parameters()

    @classmethod
    def from_module(cls, module: nn.Embedding, r: int = NOT_GIVEN, lora_alpha: float = NOT_GIVEN,
                    merge_weights: bool = NOT_GIVEN, *, spec: Optional[LoRASpec] = None,
                    **kwargs) -> "Embedding":
        """Wrap ``module`` (an ``nn.Embedding``) sharing its weight; see :meth:`LoRALayer.from_module`.
        An embedding has no adapter dropout, so its third setting by position is ``merge_weights``."""
        return super().from_module(module, r, lora_alpha, merge_weights=merge_weights, spec=spec, **kwargs)

    def _adapter_shapes(self, r: Optional[int] = None):
        r = self.r if r is None else r
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def _init_factors(self, A: Tensor, B: Tensor, r: int, init: str) -> None:
        """loralib's init: A zero, B ~ N(0, 1). PEFT's ``init_lora_weights="gaussian"`` leaves an
        embedding adapter the same way, so ``init="gaussian"`` does too."""
        nn.init.zeros_(A)
        nn.init.normal_(B)

    def _delta_blocks(self, A, B, *, scaling=None):
        acc = accumulation_dtype(self.weight.dtype)
        scaling = self.scaling if scaling is None else scaling
        yield (slice(None), slice(None)), (B.to(acc) @ A.to(acc)).t().mul_(scaling)

    def _merge_blocker(self) -> Optional[str]:
        shared = super()._merge_blocker()
        if shared is not None:
            return shared
        if self.max_norm is not None:
            # nn.Embedding renormalises looked-up rows of the weight in place,
            # which would change a merged weight irreversibly.
            return f"max_norm={self.max_norm} renormalises the weight in place (it stays unmerged in eval())"
        return None

    def _base_forward(self, x: Tensor) -> Tensor:
        return nn.Embedding.forward(self, x)

    def _mixed_index(self, x: Tensor, rows: Tensor) -> Tensor:
        return token_adapters(rows, (*x.shape, 1), x.device)  # each id is a token

    def _mixed_call(self, x: Tensor, views, index: Tensor) -> Tensor:
        adapters = [MixedAdapter(v.lora_A, v.lora_B, v.scaling, 0.0) for v in views]
        return lora_embedding_mixed(x, self.weight, adapters, index, self.padding_idx, self.max_norm,
                                    self.norm_type, self.scale_grad_by_freq, self.sparse)

    def forward(self, x: Tensor) -> Tensor:
        if self._mixed_rows is not None:
            return self._mixed_forward(x)
        if not self._uses_adapter() or self.merged:
            return self._base_forward(x)
        v = self._forward_view()
        B, scaling = v.lora_B, v.scaling
        if isinstance(scaling, Tensor):  # a hot-swappable scale, compiled: addmm_'s alpha takes only numbers
            B, scaling = B * scaling, 1.0
        return lora_embedding(x, self.weight, v.lora_A, B, scaling, self.padding_idx,
                              self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
