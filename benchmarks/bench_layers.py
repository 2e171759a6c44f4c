"""Layer benchmark: lora_layers vs loralib vs PEFT vs a frozen ``nn.Linear``.

In one process, interleaved, on the same input, it measures per implementation

* ``train``: forward + backward median time as a ratio to the *floor* (also the
  ratio of the minima, which is robust to other load on the machine), a frozen
  ``nn.Linear`` forward plus its ``dx`` backward (x requires grad, base frozen,
  every adapter gradient computed);
* ``saved``: activation bytes autograd keeps for backward beyond the input and
  the parameters (``saved_tensors_hooks``, one count per storage);
* ``eval``: the merged eval forward (``no_grad``) as a ratio to the plain forward.

Part 1 is ``Linear`` (default 3072→3072, T=2048, r=16, alpha 32, dropout 0.05
and 0, fp32 and bf16). Part 2 is ``MergedLinear`` in the Phi-3 qkv shape, equal
splits (3072→3·3072) against loralib's ``MergedLinear`` and PEFT on the fused
layer, and GQA splits (3072→3072+1024+1024), which loralib cannot express.
Part 3 is DoRA on ``Linear`` (default fp32, dropout 0.05): lora_layers'
``use_dora=True`` in both backward modes (``dora_mode="lean"`` and ``"fast"``) against
PEFT's, with both plain LoRA layers and the floor in the same interleaved run, plus
dropout-0 checks that PEFT's and lora_layers' DoRA, and the two modes, give the same
output and gradients on the same weights. Part 4 is QLoRA on ``Linear``
(default fp32 compute, dropout 0.05): one frozen bitsandbytes nf4 ``Linear4bit``
(the floor), PEFT's LoRA and lora_layers' ``Linear`` over copies of it, and
lora_layers over torchao's NF4 (``quantize_base``) of the same float weight;
with the packed weight bytes next to bf16's and the same dropout-0 check.

Every implementation gets the same base weight and, where the math is the same,
the same adapter values; the script checks that their merged outputs agree.

Usage::

    python benchmarks/bench_layers.py --out /tmp/bench_layers.json
    python benchmarks/bench_layers.py --quick            # tiny shapes, seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

FLOOR = "frozen nn.Linear"
LINEAR_IMPLS = ("loralib", "peft", "lora_layers")
PEFT_DORA, DORA, DORA_FAST = "peft DoRA", "lora_layers DoRA", "lora_layers DoRA fast"
# Part 3: each DoRA layer is compared with the plain LoRA layer of its library (lean DoRA last: the
# reference of the merged-output check for the fast one).
DORA_IMPLS = ("peft", PEFT_DORA, "lora_layers", DORA_FAST, DORA)
# Part 4: QLoRA, each name built by build_linear's implementation over a bitsandbytes nf4 layer
# (the torchao row over quantize_base's NF4 of the same float weight).
QLORA_FLOOR, PEFT_QLORA, QLORA = "frozen nf4 Linear4bit", "peft (nf4)", "lora_layers (nf4)"
QLORA_TORCHAO = "lora_layers (torchao NF4)"
QLORA_AS = {QLORA_FLOOR: FLOOR, PEFT_QLORA: "peft", QLORA: "lora_layers", QLORA_TORCHAO: "lora_layers"}


# ----------------------------------------------------------------------------- builders
# Each builder takes the frozen base layer and returns (module, trainable params,
# merge-for-eval callable). Every module owns a deep copy of the base weight, so
# merging one never touches another.

def _adapters(base: nn.Linear, r: int, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shared adapter values (fp32): A (r·n, in), B (Σ out of enabled splits, r); B is
    non-zero so the merged outputs really test the delta."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r * n, base.in_features, generator=gen) / base.in_features ** 0.5
    b = torch.randn(base.out_features, r, generator=gen) * 0.02
    return a, b


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _dora_magnitude(base: nn.Linear, ab, scaling: float, seed: int = 0) -> torch.Tensor:
    """Shared DoRA magnitude (fp32, ``(out,)``): ``‖W + s·BA‖`` per row times ``1 + 0.1·N(0, 1)``,
    so the factor ``m / ‖W + s·BA‖`` is not one and the magnitude really enters the output."""
    a, b = (t.double() for t in ab)
    norm = (base.weight.double() + scaling * b @ a).norm(dim=1)
    gen = torch.Generator().manual_seed(seed + 2)
    return (norm * (1 + 0.1 * torch.randn(norm.shape, generator=gen, dtype=torch.float64))).float()


def _peft_layer(base: nn.Linear, r: int, alpha: float, p: float, use_dora: bool = False):
    import peft

    holder = nn.Sequential(OrderedDict(proj=copy.deepcopy(base)))
    # PEFT picks its bitsandbytes layer from the model's flag (what from_pretrained sets).
    holder.is_loaded_in_4bit = type(base).__name__ == "Linear4bit"
    # get_peft_model with its defaults: on a bf16 base PEFT keeps fp32 adapters
    # (autocast_adapter_dtype=True), which is what a PEFT user gets.
    model = peft.get_peft_model(holder, peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], bias="none", use_dora=use_dora))
    layer = model.base_model.model.proj
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def build_linear(name: str, base: nn.Linear, r: int, alpha: float, p: float, ab) -> Tuple[nn.Module, list, Callable]:
    """One ``Linear`` implementation around a copy of ``base`` with adapters ``ab``."""
    a, b = ab
    if name == FLOOR:
        mod = copy.deepcopy(base).requires_grad_(False)
        return mod, [], mod.eval
    if name == "loralib":
        import loralib

        mod = loralib.Linear(base.in_features, base.out_features, r=r, lora_alpha=alpha, lora_dropout=p,
                             bias=base.bias is not None, dtype=base.weight.dtype)
        mod.load_state_dict(base.state_dict(), strict=False)
        loralib.mark_only_lora_as_trainable(mod)
        _set(mod.lora_A, a), _set(mod.lora_B, b)
        return mod, [mod.lora_A, mod.lora_B], mod.eval  # loralib merges in eval()
    dora = name in (PEFT_DORA, DORA, DORA_FAST)
    # The magnitude PEFT and lora_layers share; both use scaling alpha / r here.
    m = _dora_magnitude(base, ab, alpha / r) if dora else None
    if name in ("peft", PEFT_DORA):
        mod, pa, pb = _peft_layer(base, r, alpha, p, use_dora=dora)
        _set(pa, a), _set(pb, b)
        params = [pa, pb]
        if dora:
            pm = mod.lora_magnitude_vector["default"].weight
            _set(pm, m)
            params.append(pm)

        def merge():
            mod.merge()
            mod.eval()
        return mod, params, merge
    if name.startswith("lora_layers"):
        import lora_layers

        lora_dtype = torch.float32 if name.endswith("(fp32 A/B)") else None
        mode = {"dora_mode": "fast"} if name == DORA_FAST else {}
        mod = lora_layers.Linear.from_module(copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=p,
                                             lora_dtype=lora_dtype, use_dora=dora, **mode)
        _set(mod.lora_A, a), _set(mod.lora_B, b)
        params = [mod.lora_A, mod.lora_B]
        if dora:
            _set(mod.lora_magnitude, m)
            params.append(mod.lora_magnitude)
        return mod, params, mod.eval  # merges in eval()
    raise ValueError(f"unknown implementation {name!r}")


def build_merged(name: str, base: nn.Linear, r: int, alpha: float, p: float, splits: Sequence[int],
                 ab) -> Tuple[nn.Module, list, Callable]:
    """One fused-qkv implementation; ``splits`` are the output sizes (all enabled)."""
    a, b = ab
    n = len(splits)
    if name == FLOOR:
        return build_linear(name, base, r, alpha, p, ab)
    if name == "loralib MergedLinear":
        import loralib

        if len(set(splits)) != 1:
            raise ValueError(f"loralib's MergedLinear supports equal splits only, got {list(splits)}")
        mod = loralib.MergedLinear(base.in_features, base.out_features, r=r, lora_alpha=alpha, lora_dropout=p,
                                   enable_lora=[True] * n, bias=base.bias is not None, dtype=base.weight.dtype)
        mod.load_state_dict(base.state_dict(), strict=False)
        loralib.mark_only_lora_as_trainable(mod)
        _set(mod.lora_A, a), _set(mod.lora_B, b)  # same layout as ours for equal splits
        return mod, [mod.lora_A, mod.lora_B], mod.eval
    if name.startswith("peft fused"):
        # One adapter over the whole fused layer. With rank r·n and a block-diagonal
        # B it is exactly the per-split function; with rank r it has fewer parameters.
        same = name.endswith(f"r={r * n}")
        mod, pa, pb = _peft_layer(base, r * n if same else r, alpha * n if same else alpha, p)
        if same:
            bd = torch.zeros(base.out_features, r * n)
            o = 0
            for j, size in enumerate(splits):
                bd[o:o + size, j * r:(j + 1) * r] = b[o:o + size]
                o += size
            _set(pa, a), _set(pb, bd)
        else:
            _set(pa, a[:r]), _set(pb, b)

        def merge():
            mod.merge()
            mod.eval()
        return mod, [pa, pb], merge
    if name == "lora_layers MergedLinear":
        import lora_layers

        mod = lora_layers.MergedLinear.from_module(copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=p,
                                                   enable_lora=[True] * n, split_sizes=list(splits))
        _set(mod.lora_A, a), _set(mod.lora_B, b)
        return mod, [mod.lora_A, mod.lora_B], mod.eval
    raise ValueError(f"unknown implementation {name!r}")


# ----------------------------------------------------------------------------- measurement

def _train_step(mod: nn.Module, x: torch.Tensor, g: torch.Tensor, params: list) -> Callable[[], None]:
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        mod(x).backward(g)
    return step


def _eval_step(mod: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            mod(x)
    return step


def measure(builds: Dict[str, Tuple[nn.Module, list, Callable]], in_features: int, out_features: int,
            tokens: int, dtype: torch.dtype, reps: int, warmup: int = 1, do_eval: bool = True,
            seed: int = 0, refs: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """Time, saved bytes and merged-eval time of already-built implementations.

    The first entry of ``builds`` must be the floor and the last one lora_layers
    (the reference for the output check, unless ``refs`` maps a name to the
    lora_layers entry computing the same function). ``reps=0`` measures saved
    bytes only. Returns name -> figures.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_features, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(tokens, out_features, generator=gen).to(dtype)
    names = list(builds)
    res: Dict[str, dict] = {}
    for name, (mod, params, _) in builds.items():
        mod.train()
        sb = C.saved_bytes(lambda: mod(x), exclude=[x, *mod.parameters()])
        res[name] = {
            "saved_bytes": sb["bytes"],
            "saved_frac_of_x": sb["bytes"] / (x.numel() * x.element_size()),
            "trainable_params": sum(p.numel() for p in params),
        }
    if reps < 1:  # saved bytes only (deterministic; used by the tokens sweep)
        return res
    times = C.interleaved_times({n: _train_step(builds[n][0], x, g, builds[n][1]) for n in names},
                                reps=reps, warmup=warmup)
    floor = C.median(times[names[0]])
    for n in names:
        res[n]["train_s"] = times[n]
        res[n]["train_median_s"] = C.median(times[n])
        res[n]["train_ratio"] = res[n]["train_median_s"] / floor
        # min/min is robust to other load on a shared machine (it only ever adds time).
        res[n]["train_min_ratio"] = min(times[n]) / min(times[names[0]])
    if do_eval:
        xe = x.detach()
        for _, _, merge in builds.values():
            merge()
        outs = {}
        with torch.no_grad():
            for n in names:
                outs[n] = builds[n][0](xe).float()
        etimes = C.interleaved_times({n: _eval_step(builds[n][0], xe) for n in names}, reps=reps, warmup=warmup)
        efloor = C.median(etimes[names[0]])
        refs = refs or {}
        for n in names:
            ref = outs[refs.get(n, names[-1])]  # lora_layers is always last
            res[n]["eval_s"] = etimes[n]
            res[n]["eval_median_s"] = C.median(etimes[n])
            res[n]["eval_ratio"] = res[n]["eval_median_s"] / efloor
            res[n]["eval_min_ratio"] = min(etimes[n]) / min(etimes[names[0]])
            res[n]["max_abs_diff_vs_lora_layers"] = float((outs[n] - ref).abs().max())
        for mod, _, _ in builds.values():
            mod.train()
            if hasattr(mod, "unmerge") and getattr(mod, "merged", False):
                mod.unmerge()
    return res


def _base(in_features: int, out_features: int, dtype: torch.dtype, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False).to(dtype).requires_grad_(False)


def run_linear_case(in_features: int, out_features: int, tokens: int, r: int, alpha: float, p: float,
                    dtype: torch.dtype, reps: int, warmup: int = 1, impls: Sequence[str] = LINEAR_IMPLS,
                    do_eval: bool = True, seed: int = 0) -> dict:
    """Benchmark the floor and ``impls`` (``Linear``) on one configuration.

    Returns:
        ``{"kind": "linear", "config": {...}, "results": {name: figures}}``.
    """
    base = _base(in_features, out_features, dtype, seed)
    names = [FLOOR, *[n for n in impls if not n.startswith("lora_layers")],
             *[n for n in impls if n.startswith("lora_layers")]]
    ab = _adapters(base, r, 1, seed)
    builds = OrderedDict((n, build_linear(n, base, r, alpha, p, ab)) for n in names)
    res = measure(builds, in_features, out_features, tokens, dtype, reps, warmup, do_eval, seed)
    return {"kind": "linear", "config": {"in": in_features, "out": out_features, "tokens": tokens, "r": r,
                                         "alpha": alpha, "dropout": p, "dtype": str(dtype).split(".")[-1]},
            "results": res}


def run_merged_case(in_features: int, splits: Sequence[int], tokens: int, r: int, alpha: float, p: float,
                    dtype: torch.dtype, reps: int, warmup: int = 1, do_eval: bool = True, seed: int = 0) -> dict:
    """Benchmark fused-qkv implementations on one configuration (all splits enabled)."""
    out = sum(splits)
    base = _base(in_features, out, dtype, seed)
    n = len(splits)
    names = [FLOOR]
    if len(set(splits)) == 1:
        names.append("loralib MergedLinear")
    names += [f"peft fused r={r}", f"peft fused r={r * n}", "lora_layers MergedLinear"]
    ab = _adapters(base, r, n, seed)
    builds = OrderedDict((nm, build_merged(nm, base, r, alpha, p, splits, ab)) for nm in names)
    res = measure(builds, in_features, out, tokens, dtype, reps, warmup, do_eval, seed)
    return {"kind": "merged", "config": {"in": in_features, "splits": list(splits), "tokens": tokens, "r": r,
                                         "alpha": alpha, "dropout": p, "dtype": str(dtype).split(".")[-1]},
            "results": res}


# (numerator, denominator) of the DoRA case's train-time comparisons.
DORA_COMPARISONS = ((DORA, PEFT_DORA), (DORA, "lora_layers"), (PEFT_DORA, "peft"), (DORA_FAST, PEFT_DORA),
                    (DORA_FAST, "lora_layers"), (DORA_FAST, DORA))
# and of the QLoRA case's.
QLORA_COMPARISONS = ((QLORA, PEFT_QLORA), (QLORA_TORCHAO, PEFT_QLORA))


def _comparisons(res: Dict[str, dict], pairs, reps: int) -> List[dict]:
    """Train-time ratios ``name / over`` of the minima, of the medians, and the median of the per-round
    ratios (the two steps of a round ran moments apart, so load that drifts over the run cancels
    there); none when ``reps`` < 1."""
    if reps < 1:
        return []
    return [{"name": name, "over": over, "min_ratio": min(res[name]["train_s"]) / min(res[over]["train_s"]),
             "median_ratio": C.median(res[name]["train_s"]) / C.median(res[over]["train_s"]),
             "round_median_ratio": C.median([a / b for a, b in zip(res[name]["train_s"], res[over]["train_s"])])}
            for name, over in pairs]


def parity_p0(build: Callable[[str], tuple], names: Tuple[str, str], in_features: int, out_features: int,
              dtype: torch.dtype, tokens: int, seed: int = 0) -> dict:
    """Two implementations built by ``build(name)`` (with dropout 0, the same weights): one
    training-mode forward and backward each, on the same input and upstream gradient.

    Returns:
        ``{"names": names, "output": max abs diff, "output_scale": max abs output of the second,
        "grads": {x|A|B|m: max abs diff over the largest abs gradient}}``.
    """
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(tokens, in_features, generator=gen).to(dtype)
    g = torch.randn(tokens, out_features, generator=gen).to(dtype)
    got = []
    for name in names:
        mod, params, _ = build(name)
        xi = x.clone().requires_grad_(True)
        y = mod.train()(xi)
        y.backward(g)
        got.append((y.detach().float(), [t.grad.float() for t in (xi, *params)]))
    (y_p, g_p), (y_o, g_o) = got
    return {"names": list(names), "output": float((y_p - y_o).abs().max()), "output_scale": float(y_o.abs().max()),
            "grads": {k: float((a - b).abs().max() / b.abs().max())
                      for k, a, b in zip(("x", "A", "B", "m"), g_p, g_o)}}


def dora_parity(base: nn.Linear, r: int, alpha: float, ab, tokens: int, seed: int = 0,
                names: Tuple[str, str] = (PEFT_DORA, DORA)) -> dict:
    """Two DoRA layers (default PEFT's and lora_layers') at dropout 0 on the same weights (:func:`parity_p0`)."""
    return parity_p0(lambda name: build_linear(name, base, r, alpha, 0.0, ab), names,
                     base.in_features, base.out_features, base.weight.dtype, tokens, seed)


def run_dora_case(in_features: int, out_features: int, tokens: int, r: int, alpha: float, p: float,
                  dtype: torch.dtype, reps: int, warmup: int = 1, do_eval: bool = True, seed: int = 0) -> dict:
    """DoRA: the floor, PEFT's and lora_layers' plain LoRA and DoRA ``Linear``, one interleaved run,
    all with the same A, B (and the same magnitude for both DoRA layers), then :func:`dora_parity`.

    Returns:
        ``{"kind": "dora", "config": {...}, "results": {name: figures},
        "comparisons": [{"name", "over", "min_ratio", "median_ratio"}], "parity_p0": {...}}``.
    """
    base = _base(in_features, out_features, dtype, seed)
    names = [FLOOR, *DORA_IMPLS]
    ab = _adapters(base, r, 1, seed)
    builds = OrderedDict((n, build_linear(n, base, r, alpha, p, ab)) for n in names)
    res = measure(builds, in_features, out_features, tokens, dtype, reps, warmup, do_eval, seed,
                  refs={"peft": "lora_layers", "lora_layers": "lora_layers"})
    return {"kind": "dora", "config": {"in": in_features, "out": out_features, "tokens": tokens, "r": r,
                                       "alpha": alpha, "dropout": p, "dtype": str(dtype).split(".")[-1]},
            "results": res, "comparisons": _comparisons(res, DORA_COMPARISONS, reps),
            "parity_p0": dora_parity(base, r, alpha, ab, tokens, seed),
            "parity_fast_p0": dora_parity(base, r, alpha, ab, tokens, seed, (DORA, DORA_FAST))}


def build_qlora(name: str, base: nn.Linear, nf4: nn.Module, r: int, alpha: float, p: float,
                ab) -> Tuple[nn.Module, list, Callable]:
    """One QLoRA implementation (:data:`QLORA_AS`): over a copy of the bitsandbytes layer ``nf4``, or,
    for :data:`QLORA_TORCHAO`, over torchao's NF4 of the float ``base``."""
    if name != QLORA_TORCHAO:
        return build_linear(QLORA_AS[name], nf4, r, alpha, p, ab)
    import lora_layers

    # Quantized here, not deep-copied: torchao's NF4 copies by requantizing with its default block sizes.
    layer = copy.deepcopy(base)
    lora_layers.quantize_base(nn.Sequential(layer), targets=["0"])
    mod = lora_layers.Linear.from_module(layer, r=r, lora_alpha=alpha, lora_dropout=p)
    _set(mod.lora_A, ab[0]), _set(mod.lora_B, ab[1])
    return mod, [mod.lora_A, mod.lora_B], mod.eval


def run_qlora_case(in_features: int, out_features: int, tokens: int, r: int, alpha: float, p: float,
                   dtype: torch.dtype, reps: int, warmup: int = 1, seed: int = 0) -> dict:
    """QLoRA: a frozen bitsandbytes nf4 layer computing in ``dtype`` (the floor: forward plus ``dx``),
    PEFT's and lora_layers' LoRA over copies of it and lora_layers over torchao NF4, one interleaved
    run with the same A and B; the packed weight bytes; then :func:`parity_p0` of PEFT and lora_layers
    on the nf4 layer. Training mode throughout: eval() keeps a quantized base unmerged.

    Returns:
        ``{"kind": "qlora", "config": {...}, "results": {name: figures, with "weight_bytes"},
        "bf16_weight_bytes", "comparisons": [...], "parity_p0": {...}}``.
    """
    import bitsandbytes as bnb

    from lora_layers.quantized import weight_nbytes

    base = _base(in_features, out_features, dtype, seed)
    nf4 = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4")
    nf4.load_state_dict(base.state_dict())
    nf4 = nf4.to("cpu").requires_grad_(False)  # bitsandbytes quantizes on the move
    ab = _adapters(base, r, 1, seed)
    builds = OrderedDict((n, build_qlora(n, base, nf4, r, alpha, p, ab))
                         for n in (QLORA_FLOOR, PEFT_QLORA, QLORA_TORCHAO, QLORA))
    res = measure(builds, in_features, out_features, tokens, dtype, reps, warmup, do_eval=False, seed=seed)
    for name, (mod, _, _) in builds.items():
        res[name]["weight_bytes"] = weight_nbytes(getattr(mod, "base_layer", mod))  # PEFT's wraps the layer
    return {"kind": "qlora", "config": {"in": in_features, "out": out_features, "tokens": tokens, "r": r,
                                        "alpha": alpha, "dropout": p, "dtype": str(dtype).split(".")[-1]},
            "results": res, "bf16_weight_bytes": 2 * in_features * out_features,
            "comparisons": _comparisons(res, QLORA_COMPARISONS, reps),
            "parity_p0": parity_p0(lambda name: build_qlora(name, base, nf4, r, alpha, 0.0, ab), (PEFT_QLORA, QLORA),
                                   in_features, out_features, dtype, tokens, seed)}


# ----------------------------------------------------------------------------- report

def case_title(case: dict) -> str:
    """One line naming a case's configuration."""
    c = case["config"]
    out = "+".join(map(str, c["splits"])) if case["kind"] == "merged" else c["out"]
    return (f"{case['kind']} {c['in']}→{out}, T={c['tokens']}, r={c['r']}, alpha={c['alpha']:g}, "
            f"dropout={c['dropout']}, {c['dtype']}")


def case_table(case: dict) -> str:
    """A Markdown table of one case."""
    rows = []
    for name, f in case["results"].items():
        rows.append([
            name,
            f"{f['train_ratio']:.3f}",
            f"{f['train_min_ratio']:.3f}" if "train_min_ratio" in f else "-",
            f"{f['train_median_s'] * 1e3:.1f}",
            C.fmt_bytes(f["saved_bytes"]),
            f"{100 * f['saved_frac_of_x']:.2f}%",
            f"{f['eval_ratio']:.3f}" if "eval_ratio" in f else "-",
            f"{f['eval_min_ratio']:.3f}" if "eval_min_ratio" in f else "-",
            f"{f['max_abs_diff_vs_lora_layers']:.1e}" if "max_abs_diff_vs_lora_layers" in f and name != FLOOR else "-",
            f"{f['trainable_params']:,}",
        ])
    table = C.markdown_table(
        ["implementation", "train ratio (median)", "train ratio (min)", "train ms (median)", "saved beyond x",
         "saved / x", "merged eval ratio (median)", "(min)", "max abs diff vs lora_layers", "trainable params"], rows)
    if case["kind"] not in ("dora", "qlora"):
        return table
    parts = [table, C.markdown_table(["train time", "ratio (min)", "ratio (median)", "per-round ratio (median)"], (
        [f"{c['name']} / {c['over']}", f"{c['min_ratio']:.3f}", f"{c['median_ratio']:.3f}",
         f"{c['round_median_ratio']:.3f}"] for c in case["comparisons"]))]
    if case["kind"] == "qlora":
        bf16 = case["bf16_weight_bytes"]
        parts.append(C.markdown_table(["implementation", "base weight bytes", "/ bf16"], (
            [name, f"{f['weight_bytes']:,}", f"{f['weight_bytes'] / bf16:.3f}"]
            for name, f in case["results"].items())) + f"\n\n(bf16: {bf16:,} bytes)")
    for key in ("parity_p0", "parity_fast_p0"):
        if key in case:
            parts.append(_parity_line(case[key]))
    return "\n\n".join(parts)


def _parity_line(par: dict) -> str:
    grads = ", ".join(f"{k} {v:.1e}" for k, v in par["grads"].items())
    return (f"Dropout 0, training mode, {' vs '.join(par['names'])}: output max abs diff {par['output']:.1e} "
            f"(outputs up to {par['output_scale']:.1f}); gradients, max abs diff over the largest gradient: "
            f"{grads}.")


def _parse_shape(text: str) -> Tuple[int, int, int]:
    try:
        i, o, t = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be IN,OUT,T (three integers), got {text!r}") from None
    if min(i, o, t) < 1:
        raise argparse.ArgumentTypeError(f"--shape values must be positive, got {text!r}")
    return i, o, t


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_parse_shape, default=(3072, 3072, 2048), help="IN,OUT,T (default 3072,3072,2048)")
    ap.add_argument("--dropouts", type=_floats, default=[0.05, 0.0], help="comma list (default 0.05,0)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    ap.add_argument("--merged-dtypes", default="fp32", help="dtypes for the qkv part ('' skips it)")
    ap.add_argument("--merged-dropouts", type=_floats, default=[0.05])
    ap.add_argument("--kv", type=int, default=None, help="GQA k/v split size (default IN/3)")
    ap.add_argument("--dora-dtypes", default="fp32", help="dtypes for the DoRA part ('' skips it)")
    ap.add_argument("--dora-dropouts", type=_floats, default=[0.05])
    ap.add_argument("--qlora-dtypes", default="fp32", help="compute dtypes for the QLoRA part ('' skips it)")
    ap.add_argument("--qlora-dropouts", type=_floats, default=[0.05])
    ap.add_argument("--no-eval", action="store_true", help="skip the merged-eval timing")
    C.add_common_args(ap, reps=9)
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.rank, args.reps, args.warmup = (64, 48, 32), 4, 2, 1  # 64: whole bitsandbytes blocks
    C.set_threads(args.threads)
    in_f, out_f, tokens = args.shape
    kv = args.kv or in_f // 3
    dtypes = [C.parse_dtype(d) for d in args.dtypes.split(",") if d]
    merged_dtypes = [C.parse_dtype(d) for d in args.merged_dtypes.split(",") if d]
    dora_dtypes = [C.parse_dtype(d) for d in args.dora_dtypes.split(",") if d]
    qlora_dtypes = [C.parse_dtype(d) for d in args.qlora_dtypes.split(",") if d]

    cases = []

    def report(case):
        cases.append(case)
        print(f"\n### {case_title(case)}\n\n{case_table(case)}", flush=True)

    machine = C.machine_info()
    print(f"bench_layers: {machine}", flush=True)
    for dtype in dtypes:
        for p in args.dropouts:
            impls = list(LINEAR_IMPLS)
            if dtype != torch.float32:
                impls.append("lora_layers (fp32 A/B)")  # PEFT's default adapter dtype, for a like-for-like row
            report(run_linear_case(in_f, out_f, tokens, args.rank, args.alpha, p, dtype, args.reps,
                                   args.warmup, impls, not args.no_eval))
    for dtype in merged_dtypes:
        for p in args.merged_dropouts:
            for splits in ([in_f] * 3, [in_f, kv, kv]):
                report(run_merged_case(in_f, splits, tokens, args.rank, args.alpha, p, dtype, args.reps,
                                       args.warmup, not args.no_eval))
    for dtype in dora_dtypes:
        for p in args.dora_dropouts:
            report(run_dora_case(in_f, out_f, tokens, args.rank, args.alpha, p, dtype, args.reps, args.warmup,
                                 not args.no_eval))
    for dtype in qlora_dtypes:
        for p in args.qlora_dropouts:
            report(run_qlora_case(in_f, out_f, tokens, args.rank, args.alpha, p, dtype, args.reps, args.warmup))
    return C.finish({"reps": args.reps, "cases": cases}, argv, args.out, machine)


if __name__ == "__main__":
    main()
