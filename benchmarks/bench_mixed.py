"""Mixed-adapter batch benchmark (issue #23 item 3): K adapters in one batch vs one adapter.

In one process, interleaved, on the same input ``x`` (``T`` tokens, ``in → out``), it measures the
forward + backward of

* ``one adapter``: :func:`lora_layers.functional.lora_linear`, one rank-``r`` adapter on every token;
* ``mixed K``: :func:`lora_layers.core.mixed.lora_linear_mixed`, K rank-``r`` adapters, the batch's
  rows assigned to them in turn (``T/K`` tokens each, rows interleaved so the grouping really sorts),
  on the lean path it picks (stacked for ``K·r ≤ 64``), and ``mixed K (grouped)`` forced onto the
  grouped path (``STACKED_MAX_RANK = 0``);
* ``frozen base``: ``F.linear`` forward and its ``dx`` backward (the floor).

The base weight is frozen; every step asks for the gradients of ``x`` and of every adapter's ``A``
and ``B``. The ratio ``mixed / one adapter`` is taken between medians (and minima) of the same run,
for each dropout setting. Also reported: the bytes autograd saves beyond ``x`` and the parameters.

Usage::

    python benchmarks/bench_mixed.py --out /tmp/bench_mixed.json   # 3072→3072, T=2048, r=16, K=4
    python benchmarks/bench_mixed.py --quick                       # tiny shapes, seconds
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from lora_layers.core import mixed_lean  # noqa: E402
from lora_layers.core.mixed import MixedAdapter, lora_linear_mixed, token_adapters  # noqa: E402
from lora_layers.functional import lora_linear  # noqa: E402

ONE, FLOOR = "one adapter", "frozen base"


def _mixed_name(k: int, path: str = "") -> str:
    return f"mixed K={k}" + (f" ({path})" if path else "")


GROUPED = "grouped"


def _grouped(fn):
    """``fn()`` on the grouped lean path (tokens sorted by adapter), whatever the total rank."""
    saved = mixed_lean.STACKED_MAX_RANK
    mixed_lean.STACKED_MAX_RANK = 0
    try:
        return fn()
    finally:
        mixed_lean.STACKED_MAX_RANK = saved


def _steps(args, dropout: float) -> Dict[str, tuple]:
    """name -> (step callable, graph builder for the saved bytes, tensors alive anyway)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(args.out_features, args.in_features, generator=gen) / args.in_features ** 0.5
    bias = torch.randn(args.out_features, generator=gen) * 0.1
    rows = args.tokens // args.seq
    x = torch.randn(rows, args.seq, args.in_features, generator=gen).requires_grad_()
    g = torch.randn(rows, args.seq, args.out_features, generator=gen)
    scaling = args.alpha / args.rank

    def adapter():
        return (torch.randn(args.rank, args.in_features, generator=gen).div_(args.in_features ** 0.5)
                .requires_grad_(), (torch.randn(args.out_features, args.rank, generator=gen) * 0.02).requires_grad_())

    one = adapter()
    many = [adapter() for _ in range(args.adapters)]
    ta = token_adapters([i % args.adapters for i in range(rows)], x.shape)
    mixed = [MixedAdapter(A, B, scaling, dropout) for A, B in many]
    builders = {
        FLOOR: (lambda: F.linear(x, W, bias), [x]),
        ONE: (lambda: lora_linear(x, W, bias, *one, scaling, dropout, True), [x, *one]),
        _mixed_name(args.adapters): (lambda: lora_linear_mixed(x, W, bias, mixed, ta, training=True),
                                     [x, *[t for ab in many for t in ab]]),
        _mixed_name(args.adapters, GROUPED): (lambda: _grouped(lambda: lora_linear_mixed(x, W, bias, mixed, ta,
                                                                                          training=True)),
                                              [x, *[t for ab in many for t in ab]]),
    }

    def step(build, leaves):
        return lambda: torch.autograd.grad(build(), leaves, g)

    return {name: (step(build, leaves), build, leaves + [W, bias]) for name, (build, leaves) in builders.items()}


def _part(args, dropout: float) -> dict:
    impls = _steps(args, dropout)
    saved = {name: C.saved_bytes(build, exclude=alive)["bytes"] for name, (_, build, alive) in impls.items()}
    times = C.interleaved_times({name: fn for name, (fn, _, _) in impls.items()}, args.reps, args.warmup)
    res = {name: {"median_ms": 1e3 * C.median(t), "min_ms": 1e3 * min(t), "saved_bytes": saved[name],
                  "times_ms": [1e3 * v for v in t]} for name, t in times.items()}
    for r in res.values():
        r["ratio_to_one"] = {"median": r["median_ms"] / res[ONE]["median_ms"], "min": r["min_ms"] / res[ONE]["min_ms"]}
    rows = [(name, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['ratio_to_one']['median']:.3f}",
             f"{r['ratio_to_one']['min']:.3f}", C.fmt_bytes(r["saved_bytes"])) for name, r in res.items()]
    print(f"\ndropout {dropout}")
    print(C.markdown_table(["implementation", "median ms", "min ms", f"median / {ONE}", f"min / {ONE}",
                            "saved beyond x"], rows))
    return {"results": res, "ratio_mixed_over_one": res[_mixed_name(args.adapters)]["ratio_to_one"]}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap, reps=9)
    ap.add_argument("--in-features", type=int, default=3072)
    ap.add_argument("--out-features", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256, help="tokens per batch row (default 256)")
    ap.add_argument("--adapters", type=int, default=4, help="K (default 4)")
    ap.add_argument("--dropouts", default="0,0.05", help="comma-separated dropout settings (default 0,0.05)")
    args = ap.parse_args(argv)
    if args.quick:
        args.in_features, args.out_features, args.tokens, args.seq, args.rank, args.reps = 32, 24, 64, 8, 4, 2
    if args.tokens % args.seq:
        raise ValueError(f"--tokens={args.tokens} must be a multiple of --seq={args.seq}")
    C.set_threads(args.threads)
    machine = C.machine_info()
    print(f"{args.in_features}->{args.out_features}, T={args.tokens} ({args.tokens // args.seq} rows of "
          f"{args.seq}), r={args.rank}, K={args.adapters}, fp32, {args.threads} threads, "
          f"load {machine['loadavg_1m']}")
    parts: Dict[str, dict] = {}
    dropouts: List[float] = [float(p) for p in args.dropouts.split(",") if p.strip()]
    for p in dropouts:
        parts[f"dropout={p}"] = _part(args, p)
    config = {k: getattr(args, k) for k in ("in_features", "out_features", "tokens", "seq", "rank", "alpha",
                                            "adapters", "reps", "warmup", "threads")}
    config["stacked_max_rank"] = mixed_lean.STACKED_MAX_RANK
    return C.finish({"config": config, "parts": parts}, argv, args.out, machine)


if __name__ == "__main__":
    main()
