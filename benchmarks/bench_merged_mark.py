"""What the merged mark's fingerprints cost: ``state_dict()`` of a merged layer, and an
``eval()``/``train()`` cycle, with and without them, one process, interleaved::

    python benchmarks/bench_merged_mark.py --out /tmp/merged_mark.json

"without" patches ``weight_sums`` where the merge lifecycle calls it (``lora_layers.layers.merge_state``) to return None, which leaves the mark
as it was before the fingerprints (``lora_merged`` only): the same code path otherwise.
"""
import argparse
import contextlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import _common as C  # noqa: E402  (benchmarks/_common.py: shared timing/machine helpers)
import torch  # noqa: E402

import lora_layers as L  # noqa: E402
from lora_layers.layers import merge_state  # noqa: E402


@contextlib.contextmanager
def _no_sums():
    real = merge_state.weight_sums
    merge_state.weight_sums = lambda W: None
    try:
        yield
    finally:
        merge_state.weight_sums = real


def _without(fn):
    def run():
        with _no_sums():
            return fn()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(ap, reps=21)
    ap.add_argument("--size", type=int, default=3072, help="in = out features (default 3072)")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    machine = C.machine_info()
    size, reps = (64, 2) if args.quick else (args.size, args.reps)
    rows, payload = [], {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        layer = L.Linear(size, size, r=args.rank, lora_alpha=args.alpha, dtype=dt)
        torch.nn.init.normal_(layer.lora_B)
        layer.eval()
        state_dict, cycle = layer.state_dict, lambda: layer.train().eval()
        times = C.interleaved_times({"state_dict": state_dict, "state_dict_without": _without(state_dict),
                                     "cycle": cycle, "cycle_without": _without(cycle)},
                                    reps=reps, warmup=args.warmup)
        med = {k: C.median(v) * 1e3 for k, v in times.items()}
        low = {k: min(v) * 1e3 for k, v in times.items()}
        payload[name] = {"median_ms": med, "min_ms": low}
        for what in ("state_dict", "cycle"):
            rows.append([f"{size}×{size} {name}", "state_dict()" if what == "state_dict" else "train().eval()",
                         f"{med[what + '_without']:.2f}", f"{med[what]:.2f}",
                         f"{med[what] - med[what + '_without']:+.2f}", f"{low[what] - low[what + '_without']:+.2f}"])
    print(C.markdown_table(["layer", "call", "without (ms, median)", "with (ms, median)",
                            "extra (median)", "extra (min)"], rows))
    C.finish(payload, argv, args.out, machine)


if __name__ == "__main__":
    main()
