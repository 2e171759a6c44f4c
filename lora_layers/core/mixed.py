"""Mixed-adapter batches: every token of one call carries its own adapter (or none).

One frozen base, K adapters: token ``t`` gets

    ``y_t = x_t Wᵀ + b + s_k · drop_k(x_t) A_kᵀ B_kᵀ``  with ``k = token_adapter[t]``

and ``y_t = x_t Wᵀ + b`` where ``k = -1`` (base only). A DoRA adapter (a
:class:`~.row_scale.RowScale` hook) rescales its own tokens' adapted rows as the
single-adapter path does: ``c_k ⊙ (x_t Wᵀ + s_k·…) + b``.

The interface:

* :class:`MixedAdapter` ``(lora_A, lora_B, scaling, dropout_p, row_scale=None)``: one
  adapter, shaped as the layer's default adapter would be (Linear ``(r, in)``/``(out, r)``;
  MergedLinear stacked per enabled split as described by ``segments``; Embedding
  ``(r, num_embeddings)``/``(dim, r)``; Conv ``(r, C_in/groups·∏kernel)``/``(C_out, r)``).
  Ranks, scalings and dropouts may differ between adapters.
* :func:`token_adapters` expands per-row adapter indices to the flattened tokens.
* :func:`lora_linear_mixed`, :func:`lora_embedding_mixed`, :func:`lora_conv_mixed`.

**Rows and tokens** (:func:`token_adapters`). Rows are the leading dimension of the
layer input. For an input of 3 or more dimensions the leading size must equal the number
of rows N; each row's adapter covers its ``prod(shape[1:-1])`` tokens. A flattened input
``(tokens, in)`` is accepted when ``tokens = m·N``: it is read as N consecutive groups of
m tokens (batch-major flattening, as Hugging Face models and the Phi-3 helper flatten
``(N, L, in)``). A sequence-major flattening would be silently misread, so it is the
caller's job to flatten batch-major. Anything else raises ``ValueError``.

**Dropout.** Masks are per token row, each with its adapter's probability, all drawn
from one seed per call (:func:`~.dropout.draw_seed`) and regenerated in backward, never
stored. The rule, so a test can rebuild them: token ``t`` of adapter ``k`` uses row ``t``
of ``drop_mask(seed, (T, in), p_k)`` (:func:`~.dropout.drop_mask`), i.e. one draw of
:func:`~.dropout.random_lanes` for the whole ``(T, in)`` compared with a per-row
threshold. With one adapter on every token this is exactly ``lora_linear``'s mask.
Under ``torch.compile`` and ``torch.func`` the masks come from ``torch.rand`` instead
(as ``lora_linear`` uses ``F.dropout`` there).

**How it computes** (:mod:`.mixed_lean`). Training on a dense base without row-scale
hooks runs a lean autograd Function: one base GEMM over all tokens, and the LoRA part
either *stacked* (``Σ r_k ≤ STACKED_MAX_RANK``: the K adapters as one adapter of rank
``Σ r_k``, each token's ``u`` columns selected; the single-adapter op sequence whatever K)
or *grouped* (tokens sorted by adapter once; each adapter's products on its own tokens
only). Backward keeps ``x``, one ``T``-long int64 index and the parameters; never a mask,
``u`` (recomputed: a rank-``r`` product), a per-adapter copy of ``x`` or a ``T × out``
tensor. Gradients are computed only where asked.

A plain-op form (:mod:`.mixed_plain`) runs where a custom Function does not fit
(``torch.compile``, ``torch.func``, double backward) and for DoRA adapters and quantized
bases: exact and differentiable to any order, but it keeps autograd's usual tensors.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import recipes
from .amp import compute_dtype, no_autocast
from .autograd import _cast, _is_quantized, _out_features, tracing
from .dropout import draw_seed
from .mixed_lean import _forward, _MixedLoRA, lean_static
from .mixed_plain import _plain, _random_drop, _seeded_drop, _Spec
from .row_scale import RowScale
from .segments import Segments

__all__ = ["MixedAdapter", "token_adapters", "lora_linear_mixed", "lora_embedding_mixed", "lora_conv_mixed"]


class MixedAdapter(NamedTuple):
    """One adapter of a mixed batch (see the module docstring for the shapes)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float
    row_scale: Optional[RowScale] = None


# ----------------------------------------------------------------------------- rows -> tokens

def _row_tensor(rows, device) -> Tensor:
    if isinstance(rows, Tensor):
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise ValueError(f"rows must be a 1-D integer tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
        return rows.to(device=device, dtype=torch.long)
    rows = list(rows)
    bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise ValueError(f"rows must hold integer adapter indices (-1 = base only), got {bad[0]!r} in {rows}")
    return torch.tensor(rows, dtype=torch.long, device=device)


def token_adapters(rows, x_shape, device=None) -> Tensor:
    """Per-row adapter indices (``-1`` = base only) expanded to the tokens of an input of ``x_shape``.

    Args:
        rows: a sequence of ints or a 1-D integer tensor, one per batch row (N of them).
        x_shape: the layer input's shape ``(*, in)``; ``T = prod(x_shape[:-1])``.
        device: where the result lives.

    Returns:
        A ``(T,)`` int64 tensor: row ``i``'s index repeated over its ``T / N`` tokens.

    Raises:
        ValueError: ``rows`` is empty or not integers; a 3-D or larger input whose leading
            size is not N; ``T`` not a multiple of N (see the module docstring's rule).
    """
    idx = _row_tensor(rows, device)
    n, shape = idx.shape[0], tuple(x_shape)
    if n == 0:
        raise ValueError("rows must name at least one row, got none")
    tokens = math.prod(shape[:-1])
    if len(shape) >= 3 and shape[0] != n:
        raise ValueError(f"an input of shape {shape} has {shape[0]} rows (its leading dimension), "
                         f"but {n} row adapters were given")
    if len(shape) < 2 or tokens % n:
        raise ValueError(f"an input of shape {shape} has {tokens} tokens, not a multiple of the {n} rows: "
                         f"a flattened (tokens, in) input must hold N consecutive groups of equal size")
    return idx.repeat_interleave(tokens // n)


# ----------------------------------------------------------------------------- checks

_DTYPE_MISMATCH = ("lora_linear_mixed: x has dtype {x} but the weight has dtype {w}; they must match, as for "
                   "nn.Linear (cast the input, or run under torch.autocast)")


def _check_token_adapter(token_adapter, tokens: int, k: int, check_values: bool = True) -> Tensor:
    """The per-token indices as int64, after checking length and (outside tracing) range."""
    if not isinstance(token_adapter, Tensor) or token_adapter.dim() != 1 or token_adapter.dtype.is_floating_point \
            or token_adapter.dtype == torch.bool:
        what = (f"{token_adapter.dtype} of shape {tuple(token_adapter.shape)}" if isinstance(token_adapter, Tensor)
                else type(token_adapter).__name__)
        raise ValueError(f"token_adapter must be a 1-D integer tensor (one index per token), got {what}")
    if token_adapter.shape[0] != tokens:
        raise ValueError(f"token_adapter has {token_adapter.shape[0]} entries, but the input has {tokens} tokens")
    token_adapter = token_adapter.long()
    if check_values and tokens and not tracing() and not token_adapter.is_meta:
        lo, hi = (int(v) for v in torch.aminmax(token_adapter))
        if lo < -1 or hi >= k:
            raise ValueError(f"token_adapter values must be in [-1, {k}) for {k} adapters (-1 = base only), "
                             f"got values in [{lo}, {hi}]")
    return token_adapter


def _check_adapters(adapters, in_features: int, what: str) -> Tuple[MixedAdapter, ...]:
    adapters = tuple(MixedAdapter(*a) for a in adapters)
    if not adapters:
        raise ValueError(f"{what}: adapters must hold at least one MixedAdapter, got none")
    for k, a in enumerate(adapters):
        if a.lora_A.dim() != 2 or a.lora_B.dim() != 2 or a.lora_A.shape[1] != in_features:
            raise ValueError(f"{what}: adapters[{k}].lora_A must be (r, {in_features}) and lora_B 2-D, got "
                             f"{tuple(a.lora_A.shape)} and {tuple(a.lora_B.shape)}")
        if not 0.0 <= float(a.dropout_p) < 1.0:
            raise ValueError(f"{what}: adapters[{k}].dropout_p must be in [0, 1), got {a.dropout_p!r}")
    return adapters


class _Call(NamedTuple):
    x: Tensor
    weight: object  # a weight tensor or a quantized base
    bias: Optional[Tensor]
    adapters: Tuple[MixedAdapter, ...]
    token_adapter: Tensor  # (T,) int64
    specs: Tuple[_Spec, ...]
    prepared: Tuple[Tuple[Optional[Tensor], Optional[Tensor]], ...]  # each hook's (param, const)
    fan_in_fan_out: bool


def _checked_call(x, weight, bias, adapters, token_adapter, training, fan_in_fan_out, segments,
                  check_range: bool = True) -> _Call:
    if _is_quantized(weight) and fan_in_fan_out:
        raise ValueError("a quantized base is stored (out, in): fan_in_fan_out must be False")
    adapters = _check_adapters(adapters, x.shape[-1], "lora_linear_mixed")
    out = _out_features(weight, fan_in_fan_out)
    segs = Segments.of(segments, out)
    specs, prepared = [], []
    for k, a in enumerate(adapters):
        try:
            blocks = segs.adapter_blocks(a.lora_A, a.lora_B)
        except ValueError as err:
            raise ValueError(f"lora_linear_mixed: adapters[{k}]: {err}") from None
        specs.append(_Spec(float(a.scaling), float(a.dropout_p) if training else 0.0, blocks))
        spans = None if segs.is_full else segs.spans
        prepared.append((None, None) if a.row_scale is None else a.row_scale.prepare(
            weight, a.lora_A, a.lora_B, a.scaling, spans, fan_in_fan_out=fan_in_fan_out, rows=blocks[-1].b1))
    ta = _check_token_adapter(token_adapter, math.prod(x.shape[:-1]), len(adapters), check_range)
    return _Call(x, weight, bias, adapters, ta, tuple(specs), tuple(prepared), fan_in_fan_out)

# ----------------------------------------------------------------------------- routing

def _params(call: _Call):
    return [t for a in call.adapters for t in (a.lora_A, a.lora_B)]


def _run_plain(call: _Call, dt, seed: Optional[int]) -> Tensor:
    """The plain-op form, with the seeded masks (eager) or ``torch.rand`` ones (``seed`` None)."""
    x2 = _cast(call.x, dt).reshape(-1, call.x.shape[-1])
    hooks = tuple(None if a.row_scale is None else (a.row_scale, *pc) for a, pc in zip(call.adapters, call.prepared))
    drop = (_random_drop(call.token_adapter, call.specs) if seed is None
            else _seeded_drop(seed, call.token_adapter, call.specs))
    y = _plain(x2, call.weight, call.bias, _params(call), call.specs, hooks, call.token_adapter,
                 call.fan_in_fan_out, drop)
    return y.view(*call.x.shape[:-1], y.shape[-1])


def _run(call: _Call, dt: torch.dtype) -> Tensor:
    if tracing() or call.x.is_meta:  # meta: shapes only, no mask to draw nor tokens to sort
        return _run_plain(call, dt, None)
    seed = draw_seed() if any(s.p > 0.0 for s in call.specs) else 0
    if _is_quantized(call.weight) or any(a.row_scale is not None for a in call.adapters):
        return _run_plain(call, dt, seed)
    static = lean_static(call.specs, seed, call.fan_in_fan_out)
    args = (call.weight, call.bias, call.token_adapter, static, *_params(call))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (call.x, *args[:2], *args[4:]))):
        x2 = _cast(call.x, dt).reshape(-1, call.x.shape[-1])
        y2 = _forward(x2, call.weight, call.bias, call.token_adapter, static, args[4:])[0]
        return y2.view(*call.x.shape[:-1], y2.shape[-1])
    recipe = recipes.find(call.x)
    if recipe is not None:  # x can be rebuilt from tensors autograd keeps anyway (lora_layers.lean)
        return recipes.apply_rebuilding_input(recipe, _MixedLoRA, call.x, dt, args)
    return _MixedLoRA.apply(_cast(call.x, dt), *args)


def lora_linear_mixed(x: Tensor, weight, bias: Optional[Tensor], adapters: Sequence[MixedAdapter],
                      token_adapter: Tensor, *, training: bool = False, fan_in_fan_out: bool = False,
                      segments=None, check_range: bool = True) -> Tensor:
    """``x_t Wᵀ + b + s_k · drop_k(x_t) A_kᵀ B_kᵀ`` per token, ``k = token_adapter[t]`` (``-1``: base only).

    Args:
        x: ``(*, in)``; its ``T = prod(x.shape[:-1])`` tokens are the rows of ``token_adapter``.
        weight: ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``) or a quantized base.
        bias: ``(out,)`` or None.
        adapters: K :class:`MixedAdapter`; ``row_scale`` (e.g. DoRA) rescales that adapter's
            tokens' adapted rows.
        token_adapter: ``(T,)`` integer indices in ``[-1, K)`` (:func:`token_adapters`).
        training: dropout applies only when True.
        fan_in_fan_out, segments: as :func:`lora_layers.functional.lora_linear`; every adapter
            is stacked per enabled split as ``segments`` describe.
        check_range: check that ``token_adapter`` lies in ``[-1, K)`` (one ``aminmax``, a host sync
            on a GPU). Pass False only for indices valid by construction, as the layers' are
            (:func:`lora_layers.mixed_batch` builds them from the adapter names): an index out of
            range is then not detected.

    Returns:
        ``(*, out)``.

    Raises:
        ValueError: no adapter, an adapter whose shapes do not fit the layer, a dropout outside
            ``[0, 1)``, ``token_adapter`` not 1-D integer of length ``T`` or out of range.
        RuntimeError: ``x`` and ``weight`` dtypes differ outside autocast.
    """
    call = _checked_call(x, weight, bias, adapters, token_adapter, training, fan_in_fan_out, segments, check_range)
    # A quantized base computes in x's dtype and returns it (as bitsandbytes' layers do).
    dt = x.dtype if _is_quantized(weight) else compute_dtype(x, weight, RuntimeError, _DTYPE_MISMATCH)
    with no_autocast(x.device.type):
        return _run(call, dt)


# ----------------------------------------------------------------------------- embedding and conv (plain ops)

def _no_hooks(adapters, what: str) -> None:
    for k, a in enumerate(adapters):
        if a.row_scale is not None:
            raise ValueError(f"{what}: adapters[{k}] has a row_scale hook; only the linear layers support one")


def lora_embedding_mixed(x: Tensor, weight: Tensor, adapters: Sequence[MixedAdapter], token_adapter: Tensor,
                         padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                         norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``W[x_t] + s_k · A_kᵀ[x_t] B_kᵀ`` per token, ``k = token_adapter[t]`` (``-1``: base only).

    As :func:`lora_layers.core.functional.lora_embedding`, one adapter per token: ``lora_A``
    ``(r, num_embeddings)``, ``lora_B`` ``(dim, r)``. An embedding has no adapter dropout, so
    ``dropout_p`` must be 0. Stacked plain ops: one lookup in all adapters' ``A`` (``T × Σr``),
    zero outside each token's adapter, and one product with the scaled ``B`` stacked.
    """
    adapters = _check_adapters(adapters, weight.shape[0], "lora_embedding_mixed")
    _no_hooks(adapters, "lora_embedding_mixed")
    for k, a in enumerate(adapters):
        if a.lora_B.shape != (weight.shape[1], a.lora_A.shape[0]) or a.dropout_p:
            raise ValueError(f"lora_embedding_mixed: adapters[{k}] needs lora_B ({weight.shape[1]}, "
                             f"{a.lora_A.shape[0]}) and dropout_p 0, got {tuple(a.lora_B.shape)} and {a.dropout_p}")
    ta = _check_token_adapter(token_adapter, x.numel(), len(adapters))
    result = F.embedding(x, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    A = torch.cat([a.lora_A for a in adapters])
    u = F.embedding(x.reshape(-1), A.t(), padding_idx, None, 2.0, False, False)
    if scale_grad_by_freq:  # an id's frequency among its adapter's own tokens, as a run on its rows counts it
        _, first, counts = torch.unique(ta * weight.shape[0] + x.reshape(-1), return_inverse=True,
                                        return_counts=True)
        u = u.detach() + (u - u.detach()) * counts[first].reciprocal().to(u.dtype)[:, None]  # same values
    owner = torch.cat([torch.full((a.lora_A.shape[0],), k, device=x.device) for k, a in enumerate(adapters)])
    u = u.to(result.dtype) * (ta[:, None] == owner).to(result.dtype)
    B = torch.cat([a.lora_B.to(result.dtype) * a.scaling for a in adapters], 1)
    return result + (u @ B.t()).view(result.shape)


def lora_conv_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[MixedAdapter],
                    row_adapter: Tensor, conv, *, training: bool = False) -> Tensor:
    """``conv(x, W, b) + s_k · conv(drop_k(x_n), B_k A_k)`` per sample ``n``, ``k = row_adapter[n]``.

    As :func:`lora_layers.core.functional.lora_conv`, one adapter per sample of the batch
    dimension ``N`` of ``x`` (``(N, C_in, *spatial)``); ``row_adapter`` is ``(N,)`` in ``[-1, K)``.
    Each adapter's samples are gathered and convolved with its kernel-sized ``ΔW`` (plain ops).
    Dropout follows the module docstring's rule on ``x`` viewed as ``(N, C_in·∏spatial)``.
    """
    adapters = _check_adapters(adapters, adapters[0].lora_A.shape[1] if adapters else 0, "lora_conv_mixed")
    _no_hooks(adapters, "lora_conv_mixed")
    k_in = math.prod(weight.shape[1:])
    for k, a in enumerate(adapters):
        if a.lora_A.shape[1] != k_in or a.lora_B.shape != (weight.shape[0], a.lora_A.shape[0]):
            raise ValueError(f"lora_conv_mixed: adapters[{k}] needs lora_A (r, {k_in}) and lora_B "
                             f"({weight.shape[0]}, r), got {tuple(a.lora_A.shape)} and {tuple(a.lora_B.shape)}")
    ta = _check_token_adapter(row_adapter, x.shape[0], len(adapters))
    specs = [_Spec(float(a.scaling), float(a.dropout_p) if training else 0.0, ()) for a in adapters]
    seed = draw_seed() if any(s.p > 0.0 for s in specs) else 0
    drop = _seeded_drop(seed, ta, specs)
    xd = x if drop is None else drop(x.reshape(x.shape[0], -1)).view(x.shape)
    y = conv(x, weight, bias)
    for k, a in enumerate(adapters):
        idx = torch.nonzero(ta == k).flatten()
        if idx.numel():
            delta = (a.lora_B.to(weight.dtype) @ a.lora_A.to(weight.dtype)).view(weight.shape) * a.scaling
            y = y.index_add(0, idx, conv(xd.index_select(0, idx), delta, None))
    return y
