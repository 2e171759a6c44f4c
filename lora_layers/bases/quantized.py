"""Frozen quantized bases (QLoRA): bitsandbytes 4-bit/8-bit layers and torchao NF4 weights.

A LoRA layer over a quantized base keeps the packed weight as it is (never
copied, never dequantized at rest) and sees it through :class:`QuantizedBase`:

* :meth:`~QuantizedBase.linear`: ``x Wᵀ`` by the quantization library's own
  kernel (``bitsandbytes.matmul_4bit``, ``bitsandbytes.matmul``, torchao's
  ``linear_nf4``), the same function in every mode, never writing the packed
  weight or its quantization state;
* :meth:`~QuantizedBase.grad_input`: ``g W``, dequantizing on the fly in
  backward, so autograd keeps no dequantized weight;
* :meth:`~QuantizedBase.dequantize`: ``W`` in the compute dtype, for
  ``merge_and_unload`` and DoRA's norm.

The adapter math in :mod:`lora_layers.functional` is the same as for a plain
weight. Merging into packed weights cannot be exact, so ``eval()`` keeps these
layers unmerged. On CPU, a bitsandbytes 4-bit weight whose rows are not whole
blocks is refused (:func:`check_bnb_4bit_rows`: bitsandbytes' CPU kernels read
it wrongly). bitsandbytes and torchao are optional: they are imported only
when a quantized layer is used, and nothing here imports them to recognise one.
(:func:`lora_layers.quantize_base`, in :mod:`lora_layers.qlora`, makes torchao
NF4 bases.)
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..core.sharded import fsdp_managed, is_sharded
from ..core.wrap import adopt, plain_module

__all__ = ["QuantizedBase", "quantized_base", "is_quantized_linear", "weight_nbytes", "torchao_nf4",
           "record_compute_dtype"]


def _class_is(obj, name: str, package: str) -> bool:
    cls = type(obj)
    return cls.__name__ == name and cls.__module__.split(".")[0] == package


@contextlib.contextmanager
def _quiet_torchao():
    """torchao logs load failures of its CUDA-only extensions on import; they are harmless here."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_nf4():
    """torchao's NF4 module (``to_nf4``, ``linear_nf4``), imported quietly."""
    with _quiet_torchao():
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    return nf4_tensor


class QuantizedBase:
    """A frozen quantized ``weight`` (``(out, in)`` logically) seen through three operations.

    Built by :func:`quantized_base` from a layer; holds only references to the
    layer's own packed tensors.
    """

    kind = "quantized"

    def __init__(self, module: nn.Module):
        self.module = module
        self.out_features, self.in_features = module.out_features, module.in_features

    @property
    def shape(self):
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: what :meth:`linear` returns and :meth:`dequantize` gives."""
        raise NotImplementedError

    requires_grad = False  # a quantized base is frozen

    def linear(self, x: Tensor) -> Tensor:
        """``x Wᵀ`` (no bias) in the compute dtype, by the library's kernel; differentiable in ``x``
        (by :meth:`grad_input`), as torch.func and torch.compile need it."""
        return _BaseLinear.apply(x, self)

    def _kernel(self, x: Tensor) -> Tensor:
        """``x Wᵀ`` by the library's kernel, outside autograd."""
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """``W`` as an ``(out, in)`` tensor in the compute dtype (a new tensor)."""
        raise NotImplementedError

    def grad_input(self, g: Tensor) -> Tensor:
        """``g W`` for an upstream gradient ``g`` (``(T, out)``), dequantizing on the fly."""
        return g @ self.dequantize().to(g.dtype)

    def nbytes(self) -> int:
        """Bytes the packed weight takes (data plus quantization state)."""
        raise NotImplementedError

    def nf4_blocks(self) -> tuple:
        """``(block, scaler_block, double_quant)`` for packing this layer's weight again as NF4: the base's own
        block sizes where it has them, else NF4's 64; ``scaler_block`` None lets the packer choose;
        ``double_quant``: whether the block scales are quantized too (as torchao's NF4 always does)."""
        return 64, None, True


class _BaseLinear(torch.autograd.Function):
    """A quantized base's ``x Wᵀ`` with ``g W`` as its gradient in x. The libraries' own autograd
    Functions would keep state between forward and backward, and under torch.func they refuse to run
    (no ``setup_context``)."""

    @staticmethod
    def forward(x, base):
        return base._kernel(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.base = inputs
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, g):
        return ctx.base.grad_input(g).to(ctx.x_dtype), None


class _BnbBase(QuantizedBase):
    """A bitsandbytes layer, seen through a private module of the wrapped class that shares the
    packed Parameters and has no bias (added by the LoRA layer).

    ``linear`` calls bitsandbytes' matmul (its kernels) directly, on one path whatever the mode,
    grad mode or inference mode, and never the layer's own ``forward``: on CPU that forward
    repacks a 4-bit weight in place, lossily, in eval mode, and computes LLM.int8 by another
    function in eval (x quantized) than in training (W dequantized). The packed bytes and the
    quantization state are never written, so eval computes the function that was trained.

    The LoRA layer is not a bitsandbytes class, so bitsandbytes' ``_save_to_state_dict`` /
    ``_load_from_state_dict`` would not run: state_dict hooks registered on the LoRA layer when
    it is wrapped run them (:func:`_bnb_save_pre_hook`, :func:`_bnb_save_hook`,
    :func:`_bnb_load_pre_hook`), so ``state_dict()`` has the same keys as the bitsandbytes layer's
    and loads back as that layer would load them."""

    def __init__(self, module):
        _refuse_sharded_bnb(module, self.kind)
        super().__init__(module)
        # A LoRA layer made by from_module, or the bitsandbytes layer itself (weight_nbytes on a loaded model).
        wrapped = "_wrapped_class" in module.__dict__
        self._base = plain_module(module, ()) if wrapped else adopt(type(module), module)
        self._base._parameters["bias"] = None
        if wrapped and not module.__dict__.get("_bnb_state_hooks"):
            module.register_state_dict_pre_hook(_bnb_save_pre_hook)
            module.register_state_dict_post_hook(_bnb_save_hook)
            module._register_load_state_dict_pre_hook(_bnb_load_pre_hook, with_module=True)
            module.__dict__["_bnb_state_hooks"] = True

    @property
    def base(self) -> nn.Module:
        """The private module, holding the layer's ``weight`` as it is now (an assignment or a
        ``load_state_dict(assign=True)`` registers a new one). Refused under FSDP2 (:func:`_refuse_sharded_bnb`)."""
        _refuse_sharded_bnb(self.module, self.kind)
        base = self.__dict__.get("_base") or self.__dict__["base"]  # "base": pickled by an earlier version
        base._parameters["weight"] = self.module._parameters["weight"]
        return base

    # -- state_dict: what the bitsandbytes layer itself writes and reads -------------------------
    def _before_save(self):
        """Bring the packed weight to the layout bitsandbytes saves (its own save does this first)."""

    def _save(self, destination, prefix, keep_vars):
        """The keys the bitsandbytes layer writes besides ``weight`` and ``bias``, by its own code."""
        own = {}
        type(self.base)._save_to_state_dict(self.base, own, prefix, keep_vars)
        for key, value in own.items():
            if key not in (prefix + "weight", prefix + "bias"):
                destination[key] = value

    def _load(self, state_dict, prefix, assign, error_msgs):
        """Take (pop) the keys the bitsandbytes layer reads besides ``weight`` and ``bias``; a
        problem is appended to ``error_msgs``, the layer unchanged. With ``assign``
        (``load_state_dict(assign=True)``), the ``weight`` given becomes a bitsandbytes Parameter
        holding its quantization state, as the one it replaces."""


_BNB_SHARDED = (
    "lora_layers: a bitsandbytes {kind} base cannot be trained under FSDP2 (fully_shard{where}): fully_shard "
    "turns its Params4bit/Int8Params weight into a DTensor of plain {dtype} bytes, without the quantization "
    "state (quant_state, or the CB/SCB scales) that bitsandbytes reads them with, so its kernels would run on "
    "bytes they cannot read (elsewhere: silent zero losses or NaN gradients). Use a torchao NF4 base instead "
    "(lora_layers.quantize_base on the float model, before apply_lora and fully_shard), whose shards stay NF4, "
    "or train this model with DDP (docs/distributed.md)")


def _refuse_sharded_bnb(module, kind) -> None:
    """Raise, the same on every rank, where ``fully_shard`` manages a bitsandbytes layer (a LoRA layer over
    one): wrapping it after fully_shard, its first forward after, and anything else that reads its weight."""
    weight = module._parameters.get("weight")
    if fsdp_managed(module) or is_sharded(weight):
        where = "" if is_sharded(weight) else ", its weight gathered for the forward"
        dtype = getattr(weight, "dtype", "?")
        raise RuntimeError(_BNB_SHARDED.format(kind=kind, where=where, dtype=dtype))


def _refuse(state_dict, prefix: str) -> None:
    """Take every key of the layer itself out of ``state_dict`` (its quantization state included), so
    that a refused load leaves the layer unchanged (the refusal is in ``error_msgs``: the load raises)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if "." not in rest or rest.startswith("weight."):
            del state_dict[key]


def _bnb_base(module) -> "_BnbBase":
    base = module.__dict__.get("quantized")
    return base if isinstance(base, _BnbBase) else quantized_base(module)


def _bnb_save_pre_hook(module, prefix, keep_vars):
    module.__dict__["_bnb_keep_vars"] = keep_vars  # the post hook is not told
    _bnb_base(module)._before_save()


def _bnb_save_hook(module, destination, prefix, local_metadata):
    _bnb_base(module)._save(destination, prefix, module.__dict__.pop("_bnb_keep_vars", False))


def _bnb_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    _bnb_base(module)._load(state_dict, prefix, bool(local_metadata.get("assign_to_params_buffers")), error_msgs)


def _unpack_cpu(data, state):
    """Undo bitsandbytes' CPU repacking of a 4-bit weight exactly (rewrites ``state``): the same
    4-bit codes in bitsandbytes' standard layout, and the block scales the repacked weight holds
    (bf16 values, kept in fp32, one per block, not double-quantized). The repacking rounded the
    original scales to bf16; nothing brings those back."""
    import bitsandbytes.functional as bf

    # Its inverse would requantize the scales of a double-quantized weight: a second rounding.
    state.original_nested = False
    data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    # bitsandbytes 0.50's inverse leaves the scales in the packed (in/blocksize, out) table; read
    # that way, every block would take another block's scale.
    state.absmax = state.absmax.t().reshape(-1).float()
    state.offset = None
    return data, state


_REPACKED = (
    "lora_layers: this bitsandbytes 4-bit weight was repacked in place by bitsandbytes' CPU inference path "
    "(an eval-mode forward of the bitsandbytes layer itself, e.g. evaluating the model before adding LoRA), "
    "which rounded its block scales to bf16 for good: the scales as loaded cannot be recovered. The LoRA layer "
    "puts it back in bitsandbytes' standard layout with the values it holds now (codes unchanged, bf16-rounded "
    "scales in fp32, not double-quantized) and computes with those. To train on the weights as loaded, add "
    "LoRA before any eval-mode forward, or reload the model. (lora_layers itself never repacks a weight.)")


def _bnb_version() -> str:
    try:
        from importlib.metadata import version

        return version("bitsandbytes")
    except Exception:  # not installed: the message still says what to do
        return "(not installed)"


_BNB_ROWS = (
    "{what} has {in_features} input features, not a multiple of the {block}-weight block, and bitsandbytes' CPU "
    "4-bit kernels (dequantize_4bit, matmul_4bit; bitsandbytes {version} installed, 0.50.2 measured) read such "
    "weights wrongly when a row is not whole blocks (nf4, 64x96, blocks of 64: 25% relative error against the "
    "float weight, where the same codes read correctly give 9%; benchmarks/bnb_cpu_rows.py). {workaround}")

#: What to do instead, where a LoRA layer meets such a weight.
BNB_ROWS_WORKAROUND = (
    "Use torchao's NF4 instead (load the model in float and call lora_layers.quantize_base before apply_lora or "
    "inject_lora; it runs on CPU), or run the bitsandbytes model on a GPU")


def check_bnb_4bit_rows(what: str, in_features: int, block: int, device,
                        workaround: str = BNB_ROWS_WORKAROUND) -> None:
    """Raise ``ValueError`` where bitsandbytes would compute with a 4-bit weight of ``in_features`` columns, in
    blocks of ``block``, on ``device``, and its CPU kernels would read it wrongly (``what`` names the layer).

    bitsandbytes 0.50.2 on CPU misreads every row that is not whole blocks and whose length is a multiple of 16
    (measured for blocks of 32 to 256, nf4 and fp4, fp32/bf16/fp16); the other lengths go through another
    kernel path, which read correctly on the CPU measured but is refused too, as rows that are not whole blocks
    are what the kernels get wrong. No fixed release was available to check, so every version is refused on
    CPU. On other devices (CUDA) nothing is refused."""
    if torch.device(device).type != "cpu" or in_features % block == 0:
        return
    raise ValueError(_BNB_ROWS.format(what=what, in_features=in_features, block=block, version=_bnb_version(),
                                      workaround=workaround))


class _Bnb4bit(_BnbBase):
    kind = "bnb-4bit"

    def __init__(self, module):
        super().__init__(module)
        if "_wrapped_class" in module.__dict__:
            self._check_rows()  # before the layout below is touched
            self._standard_layout()

    def _check_rows(self):
        """Refuse a weight that bitsandbytes' CPU kernels would read wrongly (:func:`check_bnb_4bit_rows`)."""
        weight = self.base.weight
        state = getattr(weight, "quant_state", None)
        block = state.blocksize if state is not None else getattr(weight, "blocksize", 64)
        check_bnb_4bit_rows(f"this bitsandbytes Linear4bit ({self.out_features} outputs, {weight.device})",
                            self.in_features, block, weight.device)

    @property
    def dtype(self):
        """The layer's ``compute_dtype`` (fp32 if it has none; bitsandbytes would take the first input's)."""
        return self.base.compute_dtype or torch.float32

    def _standard_layout(self):
        """The weight, in bitsandbytes' standard layout: a weight repacked for its CPU inference kernel
        (before wrapping, or by the bitsandbytes layer since) is unpacked in place, with a warning."""
        weight = self.base.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            warnings.warn(_REPACKED, UserWarning, stacklevel=2)
            weight.data, weight.quant_state = _unpack_cpu(weight.data, weight.quant_state)
        return weight

    def _kernel(self, x):
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self.base)  # as its forward: FSDP may drop the quant_state
        self._check_rows()  # it may have moved to the CPU since it was wrapped
        weight = self._standard_layout()
        with torch.no_grad():  # bitsandbytes' kernel, not its autograd
            return bnb.matmul_4bit(x.to(self.dtype), weight, quant_state=weight.quant_state)

    def _state(self):
        return self.base.weight.quant_state

    def nf4_blocks(self):
        state = self._state()
        return state.blocksize, None, bool(state.nested)

    def dequantize(self):
        import bitsandbytes.functional as bf

        self._check_rows()
        data, state = self.base.weight.data, self._state()
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its AVX512-BF16 CPU inference kernel, a layout
            # dequantize_4bit does not read: unpack a copy (the layer keeps its format).
            data, state = _unpack_cpu(data, copy.copy(state))
        return bf.dequantize_4bit(data, state).to(self.dtype)

    def _before_save(self):
        # As Linear4bit._save_to_state_dict, a CPU-repacked weight (the bitsandbytes layer ran since
        # wrapping) is saved unpacked; here exactly, and it stays so.
        self._standard_layout()

    def _load(self, state_dict, prefix, assign, error_msgs):
        # Packed bytes saved with their quantization state (weight.absmax, weight.quant_map,
        # weight.quant_state.bitsandbytes__*, ...): the bytes are read with that state, as transformers
        # loads them (Params4bit.from_prequantized). Linear4bit itself copies the bytes and leaves the
        # state keys unexpected, so that the bytes would be read with the old scales.
        import bitsandbytes.functional as bf

        key = prefix + "weight"
        names = [k for k in state_dict if k.startswith(key + ".")]
        if key not in state_dict or not names:
            return
        weight = self._standard_layout()
        packed = state_dict[key]
        try:
            saved = {k[len(key) + 1:]: state_dict[k] for k in names}
            state = bf.QuantState.from_dict({k: v.clone() if isinstance(v, Tensor) else v for k, v in saved.items()},
                                            device=weight.device)
        except (ValueError, KeyError, AssertionError, TypeError) as exc:
            error_msgs.append(f"{names}: not a bitsandbytes 4-bit quantization state ({exc}) "
                              f"(this layer was left unchanged)")
            _refuse(state_dict, prefix)
            return
        if state.shape != self.shape or not isinstance(packed, Tensor) or packed.shape != weight.shape \
                or packed.dtype != weight.dtype:
            got = (tuple(packed.shape), packed.dtype) if isinstance(packed, Tensor) else type(packed).__name__
            error_msgs.append(f"{key}: a 4-bit weight of logical shape {tuple(state.shape or ())} packed as {got}, "
                              f"expected shape {tuple(self.shape)} packed as {(tuple(weight.shape), weight.dtype)} "
                              f"(this layer was left unchanged)")
            _refuse(state_dict, prefix)
            return
        for k in names:
            state_dict.pop(k)
        if assign:
            import bitsandbytes as bnb

            state_dict[key] = bnb.nn.Params4bit(
                packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=packed.dtype,
                module=getattr(weight, "module", None), bnb_quantized=True)
        else:
            weight.quant_state = state
        for module in (self._base, self.module):  # where bitsandbytes recovers a dropped quant_state from
            if isinstance(module.__dict__.get("quant_state"), bf.QuantState):
                module.__dict__["quant_state"] = state

    def nbytes(self):
        state = self._state()
        extra = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset]
                                              if getattr(state, "nested", False) else [])
        return _bytes([self.module.weight.data] + [t for t in extra if isinstance(t, Tensor)])


class _Bnb8bit(_BnbBase):
    """LLM.int8 (``Linear8bitLt``) has no compute dtype of its own (it returns its input's dtype).
    Its dtype here, fixed whatever the inputs: the bias's if the layer has a floating bias; else
    the layer's ``compute_dtype`` attribute, which :func:`record_compute_dtype` sets from the
    model's floating dtype before wrapping, and which is otherwise recorded at wrap time as
    torch's default dtype (``torch.get_default_dtype()``)."""

    kind = "bnb-8bit"

    def __init__(self, module):
        if "_wrapped_class" in module.__dict__ and getattr(module.__dict__.get("state"), "has_fp16_weights", False):
            # Its weight is a trainable float matrix, quantized on the fly in each call: no int8 base to freeze.
            raise ValueError(f"a bitsandbytes Linear8bitLt with has_fp16_weights=True holds a trainable "
                             f"{module.weight.dtype} weight, not frozen int8 codes: LoRA over it is not supported; "
                             f"build it with has_fp16_weights=False (BitsAndBytesConfig(load_in_8bit=True)'s "
                             f"default, llm_int8_has_fp16_weight=False)")
        super().__init__(module)
        if "_wrapped_class" in module.__dict__ and not isinstance(module.__dict__.get("compute_dtype"), torch.dtype):
            module.__dict__["compute_dtype"] = torch.get_default_dtype()

    @property
    def dtype(self):
        bias = self.module.bias
        if bias is not None and bias.dtype.is_floating_point:
            return bias.dtype
        recorded = self.module.__dict__.get("compute_dtype")
        return recorded if isinstance(recorded, torch.dtype) else torch.get_default_dtype()

    def _load(self, state_dict, prefix, assign, error_msgs):
        # As Linear8bitLt._load_from_state_dict: the scales (SCB) are copied into the layer's own
        # (bitsandbytes' maybe_rearrange_weight pre-hook, adopted by the LoRA layer, takes weight_format).
        saved = state_dict.get(prefix + "weight")
        if isinstance(saved, Tensor) and saved.dtype != torch.int8:
            # Linear8bitLt would cast it to int8 codes (truncating, not quantizing), read with the old scales.
            error_msgs.append(f"{prefix}weight: LLM.int8 holds int8 codes, got a {saved.dtype} weight, which would be "
                              f"cast to codes, not quantized; load a state dict saved from a Linear8bitLt, or "
                              f"quantize the float weights with bitsandbytes (BitsAndBytesConfig(load_in_8bit=True)) "
                              f"(this layer was left unchanged)")
            _refuse(state_dict, prefix)
            return
        key = prefix + "SCB"
        if key not in state_dict:
            return
        weight, scales = self.base.weight, self._scales()  # the state's once bitsandbytes' forward ran
        if scales is None:
            raise RuntimeError("Loading a quantized checkpoint into non-quantized Linear8bitLt is "
                               "not supported. Please call module.cuda() before module.load_state_dict()")
        scb = state_dict.pop(key)
        if not isinstance(scb, Tensor) or scb.shape != scales.shape:
            got = tuple(scb.shape) if isinstance(scb, Tensor) else type(scb).__name__
            error_msgs.append(f"{key}: size mismatch, got scales of shape {got}, expected {tuple(scales.shape)} "
                              f"(this layer was left unchanged)")
            _refuse(state_dict, prefix)
            return
        if assign and isinstance(state_dict.get(prefix + "weight"), Tensor):
            import bitsandbytes as bnb

            packed = state_dict[prefix + "weight"]
            weight = state_dict[prefix + "weight"] = bnb.nn.Int8Params(
                packed, requires_grad=False, has_fp16_weights=False, CB=packed, SCB=scb)
        else:
            with torch.no_grad():
                scales.copy_(scb)
        if self.base.state.SCB is not None and weight.SCB is not None:
            self.base.state.SCB = weight.SCB
        if self.base.state.CB is not None and assign:
            self.base.state.CB = weight.CB

    def _scales(self):
        state, weight = self.base.state, self.base.weight
        return weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB

    def _codes(self):
        weight = self.base.weight
        return weight.data if weight.CB is None else weight.CB

    def _kernel(self, x):
        import bitsandbytes as bnb

        # A state of its own, never the layer's (whose forward moves CB/SCB off the weight), and always
        # a training one: on CPU, bitsandbytes' eval path quantizes x and its training path does not.
        state = bnb.MatmulLtState()
        state.CB, state.SCB, state.has_fp16_weights = self._codes(), self._scales(), False
        state.threshold, state.is_training = self.base.state.threshold, True
        with torch.no_grad():
            return bnb.matmul(x, self.base.weight, state=state)

    def dequantize(self):
        import bitsandbytes.functional as bf

        return bf.int8_vectorwise_dequant(self._codes(), self._scales()).to(self.dtype)

    def nbytes(self):
        return _bytes([self.base.weight.data, self._scales()])


class _TorchaoNF4(QuantizedBase):
    kind = "torchao-nf4"

    @property
    def dtype(self):
        return self.module.weight.dtype

    def _kernel(self, x):
        with torch.no_grad():
            return torchao_nf4().linear_nf4(x.to(self.dtype), self.module.weight)

    def dequantize(self):
        weight = self.module.weight
        if is_sharded(weight):  # under FSDP2, outside forward: the whole NF4 weight, gathered (a collective)
            weight = weight.full_tensor()
        return weight.get_original_weight().to(self.dtype)

    def nf4_blocks(self):
        w = self.module.weight
        return w.block_size, w.scaler_block_size, True

    def nbytes(self):
        w = self.module.weight
        w = w.to_local() if is_sharded(w) else w  # under fully_shard: this rank's NF4 shard
        return _bytes([getattr(w, name) for name in w.__tensor_flatten__()[0]])


def _is_nf4(weight) -> bool:
    """A torchao NF4 weight, or a DTensor (fully_shard) whose shards are NF4."""
    return _class_is(weight.to_local() if is_sharded(weight) else weight, "NF4Tensor", "torchao")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def is_quantized_linear(module: nn.Module) -> bool:
    """True for bitsandbytes ``Linear4bit``/``Linear8bitLt`` and ``nn.Linear`` with a torchao NF4 weight."""
    return _kind(module) is not None


def _kind(module):
    if _class_is(module, "Linear4bit", "bitsandbytes"):
        return _Bnb4bit
    if _class_is(module, "Linear8bitLt", "bitsandbytes"):
        return _Bnb8bit
    if isinstance(module, nn.Linear) and _is_nf4(module._parameters.get("weight")):
        return _TorchaoNF4
    return None


def quantized_base(module: nn.Module) -> Optional[QuantizedBase]:
    """The :class:`QuantizedBase` view of a (LoRA-wrapped) quantized linear layer, or None for a plain one."""
    wrapped = module.__dict__.get("_wrapped_class")
    if wrapped is not None and wrapped.__module__.split(".")[0] == "bitsandbytes":
        kind = {"Linear4bit": _Bnb4bit, "Linear8bitLt": _Bnb8bit}.get(wrapped.__name__)
    else:
        kind = _kind(module) or (_TorchaoNF4 if _is_nf4(module._parameters.get("weight")) else None)
    return None if kind is None else kind(module)


def record_compute_dtype(model: nn.Module, modules=None) -> Optional[torch.dtype]:
    """Record the model's floating dtype as the compute dtype of its bias-free bitsandbytes
    ``Linear8bitLt`` layers (all of them, or those in ``modules``), before they are wrapped.

    LLM.int8 layers have no dtype of their own; the LoRA layer over one creates its adapters,
    and ``merge_and_unload`` its plain ``nn.Linear``, in this dtype. The model's floating dtype is
    the most common one, by element count, of its floating Parameters outside quantized layers
    (e.g. the embeddings). A layer that already has a ``compute_dtype`` keeps it. Returns the
    dtype, or None when the model has no such Parameter (nothing is recorded then)."""
    counts = {}
    for module in model.modules():
        if is_quantized_linear(module) or getattr(module, "quantized", None) is not None:
            continue
        for p in module.parameters(recurse=False):
            if p.dtype.is_floating_point:
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return None
    dtype = max(counts, key=counts.get)
    for module in (model.modules() if modules is None else modules):
        if (_class_is(module, "Linear8bitLt", "bitsandbytes") and module.bias is None
                and not isinstance(module.__dict__.get("compute_dtype"), torch.dtype)):
            module.compute_dtype = dtype
    return dtype


def weight_nbytes(module: nn.Module) -> int:
    """Bytes the layer's base weight takes: packed bytes for a quantized base; under ``fully_shard``, this
    rank's shard (what it holds outside forward)."""
    base = quantized_base(module)
    weight = module.weight.to_local() if is_sharded(module.weight) else module.weight
    return base.nbytes() if base is not None else _bytes([weight])
