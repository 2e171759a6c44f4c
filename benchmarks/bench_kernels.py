"""Fused Triton LoRA kernels against the frozen-base floor, PEFT and the torch path.

Runs on one CUDA GPU (sized for an H100: under 5 minutes including autotuning)::

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.md

1. Correctness on CUDA at every shape: the triton path against the torch path
   (dropout 0) and against a float32 formula with the kernels' own dropout mask
   (dropout 0.05); norm-relative error of y, dx, dA, dB, and no NaN/Inf.
2. Timings (CUDA events, median of --reps) of one forward + backward at the
   Phi-3-mini layer shapes, bf16, T tokens, r=16, dropout 0.05 and 0:
   - floor: frozen ``F.linear`` forward + dx (what a LoRA layer cannot beat);
   - peft: PEFT's LoRA Linear (if peft imports), adapters as PEFT casts them;
   - torch: ``lora_layers.functional.lora_linear(backend="torch")``;
   - triton-fused: triton path, base GEMMs in Triton with the LoRA terms folded in;
   - triton-cublas: triton path, base GEMMs in cuBLAS, LoRA terms added in place.
   qkv and gate_up also run as MergedLinear segments ([q|k|v], [gate|up], r=16 each).
3. A Markdown table of time ratios to the floor and peak memory above the
   inputs (``torch.cuda.max_memory_allocated``), printed and written to --out.

Without CUDA it prints a message and exits 0. ``--smoke`` runs the same code on
CPU in triton's interpreter at toy sizes (checks the script, not the speed);
``--smoke --quick`` only one of those shapes, with dropout, once (benchmarks/gpu_check.sh's quick dry run).
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import _common as C  # noqa: E402  (benchmarks/_common.py: shared table/machine helpers)

# (name, in_features, out_features, segment sizes or None)
PHI3_MINI = [("qkv", 3072, 9216, (3072, 3072, 3072)), ("o", 3072, 3072, None),
             ("gate_up", 3072, 16384, (8192, 8192)), ("down", 8192, 3072, None)]
SMOKE = [("qkv", 48, 72, (24, 24, 24)), ("o", 48, 48, None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kernels.md"),
                    help="Markdown file for the table (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=8192, help="T, tokens per batch (default 8192)")
    ap.add_argument("--rank", type=int, default=16, help="r per split (default 16)")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions (default 5)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU + TRITON_INTERPRET=1 at toy sizes: checks the script only")
    ap.add_argument("--quick", action="store_true",
                    help="with --smoke: one layer shape (plain and merged), dropout 0.05 only, one timed repetition")
    args = ap.parse_args(argv)
    if args.quick and not args.smoke:
        ap.error("--quick only shrinks --smoke")
    for name in ("tokens", "rank", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Case:
    """Inputs of one layer shape; segments=None for a plain Linear."""

    def __init__(self, torch, name, in_f, out_f, sizes, T, r, dtype, device, merged):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.name = name + ("[merged]" if merged else "")
        self.segments = None
        R, b_rows = r, out_f
        if merged:
            bounds = [0]
            for s in sizes:
                bounds.append(bounds[-1] + s)
            self.segments = tuple(zip(bounds[:-1], bounds[1:]))
            R = r * len(sizes)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.x = rnd(T, in_f).requires_grad_(True)
        self.w = rnd(out_f, in_f, scale=in_f ** -0.5)
        self.A = rnd(R, in_f, scale=in_f ** -0.5).requires_grad_(True)
        self.B = rnd(b_rows, r, scale=0.1).requires_grad_(True)
        self.g = rnd(T, out_f)
        self.in_f, self.out_f, self.r, self.scaling = in_f, out_f, r, 2.0

    def zero(self):
        self.x.grad = self.A.grad = self.B.grad = None


def make_runners(torch, F, functional, case, p, peft_layer):
    """name -> zero-arg callable doing one forward + backward."""
    c = case

    def floor():
        c.x.grad = None
        F.linear(c.x, c.w).backward(c.g)

    def lora(backend, gemm=None):
        def run():
            if gemm is not None:
                os.environ["LORA_LAYERS_TRITON_GEMM"] = gemm
            c.zero()
            y = functional.lora_linear(c.x, c.w, None, c.A, c.B, c.scaling, p, True,
                                       segments=c.segments, backend=backend)
            y.backward(c.g)
        return run

    runners = {"floor": floor}
    if peft_layer is not None:
        def peft():
            c.x.grad = None
            peft_layer.zero_grad(set_to_none=True)
            peft_layer(c.x).backward(c.g)
        runners["peft"] = peft
    runners["torch"] = lora("torch")
    runners["triton-fused"] = lora("triton", "fused")
    runners["triton-cublas"] = lora("triton", "cublas")
    return runners


def build_peft(torch, case, p, dtype, device):
    """PEFT's LoRA Linear around the same frozen weight, or (None, reason)."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # peft is optional
        return None, f"peft not importable ({type(exc).__name__})"
    if case.segments is not None:
        return None, "PEFT has no fused-split layer"
    try:
        holder = torch.nn.Module()
        holder.lin = torch.nn.Linear(case.in_f, case.out_f, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            holder.lin.weight.copy_(case.w)
        cfg = LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=p, target_modules=["lin"])
        model = get_peft_model(holder, cfg)
        return model.base_model.model.lin, ""
    except Exception as exc:  # a PEFT API change must not stop the other rows
        return None, f"peft layer failed: {exc!r}"


def check_correctness(torch, functional, kernels, case, dtype):
    """Triton vs torch path (p=0) and vs a float32 formula with the kernels' mask (p>0)."""
    c = case
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    errs = []
    outs = {}
    for backend in ("torch", "triton"):
        c.zero()
        y = functional.lora_linear(c.x, c.w, None, c.A, c.B, c.scaling, 0.0, True,
                                   segments=c.segments, backend=backend)
        y.backward(c.g)
        outs[backend] = [y.detach(), c.x.grad, c.A.grad, c.B.grad]
    for name, a, b in zip(("y", "dx", "dA", "dB"), outs["triton"], outs["torch"]):
        errs.append((f"p=0 {name}", rel_err(a, b), bool(torch.isfinite(a).all())))

    p = 0.05
    torch.manual_seed(1)
    keep = kernels.keep_mask(kernels.draw_seed(), c.x.shape, p, c.x.device)
    torch.manual_seed(1)
    c.zero()
    y = functional.lora_linear(c.x, c.w, None, c.A, c.B, c.scaling, p, True,
                               segments=c.segments, backend="triton")
    y.backward(c.g)
    got = [y.detach(), c.x.grad, c.A.grad, c.B.grad]
    xr, Ar, Br = (t.detach().float().requires_grad_(True) for t in (c.x, c.A, c.B))
    yr = functional.lora_linear(xr, c.w.float(), None, Ar, Br, c.scaling, 0.0, False,
                                segments=c.segments, backend="torch")
    # the dropout term, rebuilt with the kernels' mask: s * ((drop(x) - x) A^T) B^T
    delta = functional.lora_linear(xr * (keep / (1 - p) - 1), torch.zeros_like(c.w, dtype=torch.float32),
                                   None, Ar, Br, c.scaling, 0.0, False, segments=c.segments,
                                   backend="torch")
    (yr + delta).backward(c.g.float())
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, [yr + delta, xr.grad, Ar.grad, Br.grad]):
        errs.append((f"p={p} {name}", rel_err(a, b), bool(torch.isfinite(a).all())))
    c.zero()
    ok = all(e <= tol and finite for _, e, finite in errs)
    return ok, errs, tol


def time_runner(torch, fn, reps, warmup, cuda):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench_kernels: no CUDA device here; this benchmark needs one GPU "
              "(use --smoke to check the script on CPU). Nothing was measured.")
        return 0
    from lora_layers import functional, kernels

    if not kernels.is_available():
        print("bench_kernels: triton is not importable; install lora_layers[triton]. "
              "Nothing was measured.")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = PHI3_MINI if cuda else SMOKE[:1] if args.quick else SMOKE
    T = args.tokens if cuda else 40
    reps, warmup = (args.reps, args.warmup) if cuda else (1, 0) if args.quick else (2, 1)
    card = torch.cuda.get_device_name() if cuda else "CPU (triton interpreter, --smoke)"
    print(f"# bench_kernels on {card}: T={T}, r={args.rank}, {str(dtype)[6:]}")

    rows, failures, notes = [], [], []
    for name, in_f, out_f, sizes in shapes:
        for merged in ([False, True] if sizes else [False]):
            case = Case(torch, name, in_f, out_f, sizes, T, args.rank, dtype, device, merged)
            ok, errs, tol = check_correctness(torch, functional, kernels, case, dtype)
            worst = max(errs, key=lambda e: e[1])
            print(f"check {case.name}: {'ok' if ok else 'FAILED'} (worst {worst[0]} rel err "
                  f"{worst[1]:.2e}, tol {tol:.0e})")
            if not ok:
                failures.append((case.name, errs))
                continue
            for p in ((0.05,) if args.quick else (0.05, 0.0)):
                peft_layer, why = build_peft(torch, case, p, dtype, device)
                if peft_layer is None and why not in notes:
                    notes.append(why)
                runners = make_runners(torch, F, functional, case, p, peft_layer)
                stats = {}
                for label, fn in runners.items():
                    stats[label] = (time_runner(torch, fn, reps, warmup, cuda),
                                    C.cuda_peak_growth(fn) if cuda else None)
                floor = stats["floor"][0]
                for label, (ms, mem) in stats.items():
                    rows.append((case.name, f"{in_f}->{out_f}", p, label, f"{ms:.3f}",
                                 f"{ms / floor:.3f}", "-" if mem is None else f"{mem / 2**20:.0f}"))
                    print("  " + " | ".join(str(x) for x in rows[-1]))
                del runners, peft_layer
            del case
            if cuda:
                torch.cuda.empty_cache()
    os.environ.pop("LORA_LAYERS_TRITON_GEMM", None)

    headers = ["layer", "shape", "dropout", "method", "median ms", "ratio to floor",
               "peak MiB above inputs"]
    lines = [f"# LoRA kernel benchmark: {card}", "",
             f"T={T} tokens, r={args.rank} per split, {str(dtype)[6:]}, forward + backward, "
             f"median of {reps} ({'CUDA events' if cuda else 'wall clock, meaningless'}). "
             "floor = frozen F.linear forward + dx. peft keeps its default fp32 adapters "
             "(autocast_adapter_dtype); lora_layers rows use bf16 adapters.",
             "triton-fused: base GEMMs in Triton with the LoRA terms folded in; "
             "triton-cublas: cuBLAS base GEMMs + in-place LoRA terms.", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in C.machine_info(str(device)).items()), "",
             C.markdown_table(headers, rows)]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    if failures:
        lines += ["", "Correctness FAILED (not timed): " + ", ".join(n for n, _ in failures)]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
