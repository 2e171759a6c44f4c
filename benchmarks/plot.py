"""Charts for docs/benchmarks.md: layer sweeps for loralib, PEFT and lora_layers.

Three PNGs go into ``docs/img/``:

* ``ratio_vs_rank.png``: train (forward + backward) time / frozen ``nn.Linear``,
  against the rank r = 4 … 128 (ratio of the minimum times by default: other
  load on a shared machine inflates the many small LoRA ops more than the
  floor's single GEMM, and only ever adds time);
* ``ratio_vs_width.png``: the same against the layer width (square layers);
* ``saved_vs_tokens.png``: activation bytes saved for backward beyond the input,
  against the token count, fp32 and bf16.

The sweeps come from :mod:`bench_layers` (same builders, same interleaved
timing). To keep a CPU run within a few minutes the time sweeps use fewer
tokens than the 2048 of the main table (``--tokens``, default 512); the charts
say so. Saved bytes do not depend on timing and use the full 3072 width.

Usage::

    python benchmarks/plot.py --data /tmp/sweeps.json           # run sweeps, save data, plot
    python benchmarks/plot.py --data /tmp/sweeps.json --no-run  # re-plot saved data
    python benchmarks/plot.py --quick --outdir /tmp/img         # tiny smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import bench_layers as BL  # noqa: E402

IMPLS = ("loralib", "peft", "lora_layers")
STYLE = {"loralib": dict(color="#1f77b4", marker="s"), "peft": dict(color="#d62728", marker="^"),
         "lora_layers": dict(color="#2ca02c", marker="o")}
LABEL = {"loralib": "loralib 0.1.2", "peft": "PEFT", "lora_layers": "lora_layers"}
DEFAULT_OUTDIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "img")


def run_sweeps(ranks: Sequence[int], widths: Sequence[int], token_counts: Sequence[int], tokens: int,
               rank_width: int, saved_width: int, p: float, reps: int) -> dict:
    """Run the three sweeps; returns JSON-ready data (train ratios, saved bytes)."""
    def record(key, x, case):
        for stat, field in (("median", "train_ratio"), ("min", "train_min_ratio")):
            data[f"{key}_{stat}"][str(x)] = {n: case["results"][n][field] for n in IMPLS}
        print(f"{key} {x}: {data[key + '_min'][str(x)]} (min), {data[key + '_median'][str(x)]} (median)", flush=True)

    data = {"machine": C.machine_info(), "tokens": tokens, "dropout": p, "reps": reps, "rank_width": rank_width,
            "saved_width": saved_width, "rank_median": {}, "rank_min": {}, "width_median": {}, "width_min": {},
            "saved": {"fp32": {}, "bf16": {}}}
    # A discarded first case: the first timings of a fresh process (thread pool start-up,
    # first-touch page faults, lazy imports) were seen to inflate the first sweep point.
    BL.run_linear_case(rank_width, rank_width, tokens, ranks[0], 2 * ranks[0], p, torch.float32, max(1, reps // 3),
                       do_eval=False)
    for r in ranks:
        record("rank", r, BL.run_linear_case(rank_width, rank_width, tokens, r, 2 * r, p, torch.float32, reps,
                                             do_eval=False))
    for w in widths:
        record("width", w, BL.run_linear_case(w, w, tokens, 16, 32, p, torch.float32, reps, do_eval=False))
    for dname in ("fp32", "bf16"):
        for t in token_counts:
            case = BL.run_linear_case(saved_width, saved_width, t, 16, 32, p, C.parse_dtype(dname), 0, do_eval=False)
            data["saved"][dname][str(t)] = {n: case["results"][n]["saved_bytes"] for n in IMPLS}
        print(f"saved {dname}: {data['saved'][dname]}", flush=True)
    return data


def _save(fig, path: str) -> None:
    C.atomic_write(path, lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"), binary=True)


def _footer(data: dict, extra: str, stat: str) -> str:
    m = data["machine"]
    how = "ratio of the minimum times" if stat == "min" else "ratio of the median times"
    return (f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, {m['date']}; {extra};\n"
            f"{how} over {data['reps']} interleaved reps (min is robust to other load on a shared machine)")


def _ratio_chart(plt, series: Dict[str, Dict[str, float]], xlabel: str, title: str, footer: str, path: str,
                 log2x: bool) -> None:
    xs = sorted(int(k) for k in series)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n in IMPLS:
        ax.plot(xs, [series[str(x)][n] for x in xs], label=LABEL[n], linewidth=2, **STYLE[n])
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.text(xs[0], 1.0, " frozen nn.Linear (floor)", va="bottom", fontsize=8, color="gray")
    if log2x:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("train fwd+bwd time / frozen nn.Linear")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.text(0.01, -0.04, footer, fontsize=7, color="dimgray", wrap=True)
    _save(fig, path)
    plt.close(fig)


def _saved_chart(plt, data: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for dname, ls, fill in (("fp32", "-", "full"), ("bf16", "--", "none")):
        series = data["saved"][dname]
        xs = sorted(int(k) for k in series)
        for n in IMPLS:
            ys = [series[str(x)][n] / 2**20 for x in xs]
            ax.plot(xs, ys, linestyle=ls, fillstyle=fill, markersize=8 if fill == "none" else 6,
                    label=f"{LABEL[n]} ({dname})", linewidth=2, **STYLE[n])
    t0 = xs[len(xs) // 2]
    if data["saved"]["bf16"][str(t0)]["peft"] == data["saved"]["fp32"][str(t0)]["peft"]:
        ax.annotate("PEFT bf16 = PEFT fp32\n= loralib fp32 (PEFT\nruns bf16 adapters in\nfp32: an fp32 copy of x)",
                    xy=(t0, data["saved"]["bf16"][str(t0)]["peft"] / 2**20), xytext=(xs[0] * 1.05, 0.25),
                    fontsize=8, color=STYLE["peft"]["color"], ha="left",
                    arrowprops=dict(arrowstyle="->", color=STYLE["peft"]["color"]))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted(int(k) for k in data["saved"]["fp32"])
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("tokens T")
    ax.set_ylabel("saved activations beyond x (MiB, log)")
    w = data["saved_width"]
    ax.set_title(f"Activation memory saved for backward, {w}→{w}, r=16, dropout {data['dropout']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    m = data["machine"]
    fig.text(0.01, -0.04, f"Counted with saved_tensors_hooks, one count per storage; deterministic "
             f"(torch {m['torch']}, {m['date']})", fontsize=7, color="dimgray")
    _save(fig, path)
    plt.close(fig)


def plot_all(data: dict, outdir: str, stat: str = "min") -> List[str]:
    """Write the three PNGs into ``outdir``; returns their paths.

    Args:
        data: what :func:`run_sweeps` returned.
        outdir: folder for the PNGs (created if missing).
        stat: ``"min"`` or ``"median"``: which time ratio the two time charts show.

    Raises:
        ValueError: unknown ``stat``.
    """
    if stat not in ("min", "median"):
        raise ValueError(f"stat must be 'min' or 'median', got {stat!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(outdir, n) for n in ("ratio_vs_rank.png", "ratio_vs_width.png", "saved_vs_tokens.png")]
    t, p, w = data["tokens"], data["dropout"], data["rank_width"]
    note = f"reduced T={t} (main table: T=2048) to keep the CPU sweep short"
    _ratio_chart(plt, data[f"rank_{stat}"], "rank r (alpha = 2r)",
                 f"Train time vs rank, {w}→{w}, T={t}, fp32, dropout {p}", _footer(data, note, stat), paths[0], True)
    _ratio_chart(plt, data[f"width_{stat}"], "layer width (in = out)",
                 f"Train time vs width, r=16, T={t}, fp32, dropout {p}", _footer(data, note, stat), paths[1], False)
    _saved_chart(plt, data, paths[2])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="sweep JSON: written after a run, read with --no-run")
    ap.add_argument("--no-run", action="store_true", help="plot --data without running the sweeps")
    ap.add_argument("--outdir", default=DEFAULT_OUTDIR)
    ap.add_argument("--tokens", type=int, default=512, help="T for the time sweeps (default 512)")
    ap.add_argument("--rank-width", type=int, default=1024, help="layer width of the rank sweep")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stat", choices=("min", "median"), default="min",
                    help="time ratio to chart: of the minima (default, robust to other load) or of the medians")
    ap.add_argument("--quick", action="store_true", help="tiny sweeps, 1 rep (smoke test)")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    if args.no_run:
        if not args.data:
            raise SystemExit("--no-run needs --data")
        with open(args.data) as f:
            data = json.load(f)
    else:
        if args.quick:
            data = run_sweeps([4, 8], [32, 48], [16, 32], 16, 32, 48, args.dropout, 1)
        else:
            data = run_sweeps([4, 8, 16, 32, 64, 128], [256, 512, 1024, 2048, 3072], [256, 512, 1024, 2048, 4096],
                              args.tokens, args.rank_width, 3072, args.dropout, args.reps)
        if args.data:
            C.write_json(args.data, data)
    paths = plot_all(data, args.outdir, args.stat)
    print("\n".join(f"wrote {p}" for p in paths))
    return paths


if __name__ == "__main__":
    main()
