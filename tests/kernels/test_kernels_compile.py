"""Ahead-of-time compilation of the Triton kernels for a real NVIDIA target.

The other kernel tests run in triton's CPU interpreter, which never invokes the
real compiler, so it misses what only the compiler checks (tl.dot operand
types, layouts, block shapes, num_warps/num_stages, ptxas). This test compiles
every ``@triton.jit`` kernel for sm_90 (H100) to PTX and a cubin, without a GPU.

How: a subprocess (TRITON_INTERPRET removed, so ``@triton.jit`` builds real
kernels) calls the real launchers in ``_ops`` on CPU tensors with ``_launch``
replaced by a recorder, so the argument lists are exactly those of real
launches. Each recorded launch is then specialised by triton's own binder (the
code a CUDA launch runs: pointer dtypes, 16-divisibility, ints equal to 1) for
every autotune config, and compiled with ``triton.compile`` for the target.

Coverage is a representative subset, to stay under a minute on 2 cores: x/adapter
dtypes fp16/fp16 (every autotune config), bf16/fp32 and fp32/fp32 (the last,
smallest-tile config of each kernel), each with dropout, two MergedLinear
segments, bias and rank 64 (BLOCK_R=64), both backward GEMM modes; the fp16
dx/dA kernel at rank 1 with dropout (a former compile failure); and the
dropout-mask kernel. The full matrix (all five dtype pairs, with and without
dropout and segments, several ranks, T=1, odd shapes, sm_80 and sm_90) was run
once by hand; see docs/kernels.md.

What it does not prove: that the kernels give right answers on a GPU, run
fast, or fit a given GPU's limits at launch beyond the shared-memory check below.
"""
import json
import os
import subprocess
import sys

import pytest

#: Largest dynamic shared memory one block may use on H100 (227 KiB).
H100_MAX_SHARED_PER_BLOCK = 227 * 1024
ARCH = 90
N_WORKERS = 2


def _worker_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, no cache hits
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default; silences its warning
    return env


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    procs = [subprocess.Popen([sys.executable, __file__, str(ARCH), str(w), str(N_WORKERS)],
                              env=_worker_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for w in range(N_WORKERS)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"AOT worker crashed:\n{err[-4000:]}"
        payload = json.loads(out.strip().splitlines()[-1])
        if "skip" in payload:
            pytest.skip(payload["skip"])
        results += payload["results"]

    failed = [r for r in results if not r["ok"]]
    assert not failed, "kernels failed to compile for sm_%d:\n%s" % (
        ARCH, "\n\n".join(f"{r['kernel']} {r['config']} {r['types']}:\n{r['error']}" for r in failed))
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_down_kernel", "_fwd_kernel", "_bwd_g_kernel", "_bwd_x_kernel",
                       "_keep_mask_kernel"}
    for r in results:
        assert r["cubin_bytes"] > 0 and r["ptx_has_entry"], r
        assert r["target"] == f"sm_{ARCH}" or r["target"] == f"sm_{ARCH}a", r
    # A config whose shared memory exceeds the limit fails at launch; the
    # autotuner skips it, but each kernel variant needs at least one that fits.
    best = {}
    for r in results:
        key = (r["kernel"], r["variant"])
        best[key] = min(best.get(key, float("inf")), r["shared"])
    too_big = {k: v for k, v in best.items() if v > H100_MAX_SHARED_PER_BLOCK}
    assert not too_big, f"no autotune config fits H100 shared memory: {too_big}"
    # Tensor-core lowering: on sm_90 the half-precision GEMMs should use wgmma.
    fwd_half = [r for r in results if r["kernel"] == "_fwd_kernel" and "fp16" in r["types"]["x_ptr"]]
    assert fwd_half and all(r["wgmma"] for r in fwd_half)


# ---------------------------------------------------------------------------
# Worker (runs in the subprocess, TRITON_INTERPRET unset)
# ---------------------------------------------------------------------------
def _skip(reason):
    print(json.dumps({"skip": reason}))
    sys.exit(0)


def _record_launches():
    """Call the real launchers on CPU tensors; return [(name, jit_fn, args, kwargs, configs)]."""
    import torch
    import triton

    from lora_layers.kernels import _ops
    from lora_layers.segments import Segments
    from lora_layers.kernels import _triton_kernels as K

    if _ops.INTERPRETED:
        _skip("kernels were imported in interpreter mode")
    jit = {"fwd": K._fwd_kernel, "bwd_x": K._bwd_x_kernel, "down": K._down_kernel,
           "bwd_g": K._bwd_g_kernel}
    records = []
    all_configs = [True]

    def fake_launch(name, grid_fn, interp_meta, *args, **kwargs):
        configs = _ops._tuned(name).configs
        records.append((name, jit[name], args, kwargs, configs if all_configs[0] else configs[-1:]))

    class FakeMaskKernel:  # keep_mask launches without autotuning
        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append(
                ("mask", mask_fn, args, kwargs, [triton.Config({})]))

    mask_fn = K._keep_mask_kernel
    _ops._launch = fake_launch
    K._keep_mask_kernel = FakeMaskKernel()

    T, Kd, N, R, p, seed, scaling = 64, 96, 80, 64, 0.1, 1234, 2.0
    segs = Segments(80, ((0, 40), (50, 80)))  # the private launchers take a Segments
    r = R // segs.count
    # Every autotune config for fp16; only the last (a small tile) for the
    # other dtype pairs, which keeps the test under a minute on 2 cores.
    for x_dt, ad_dt in [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32)]:
        all_configs[0] = x_dt == torch.float16
        x, g = torch.randn(T, Kd, dtype=x_dt), torch.randn(T, N, dtype=x_dt)
        w, bias = torch.randn(N, Kd, dtype=x_dt), torch.randn(N, dtype=x_dt)
        A, B = torch.randn(R, Kd, dtype=ad_dt), torch.randn(N - 10, r, dtype=ad_dt)
        u = _ops.down_proj(x, A, seed, p)
        _ops.forward_fused(x, w, bias, u, B, scaling, segs, False, r)
        _ops.backward_g(g, u, B, scaling, segs, r, True, True)
        for mode in _ops.GEMM_MODES:
            _ops.backward_x(g, w, u, A, x, seed, p, False, True, True, mode)
    # Rank 1 with dropout: R == 1 used to be specialised to a constexpr, which
    # made the fp16 dx/dA kernel fail to compile for sm_90 (see _bwd_x_kernel).
    x, g = torch.randn(T, Kd, dtype=torch.float16), torch.randn(T, N, dtype=torch.float16)
    w, A1, du1 = (torch.randn(*shape, dtype=x.dtype) for shape in ((N, Kd), (1, Kd), (T, 1)))
    _ops.backward_x(g, w, du1, A1, x, seed, p, False, True, True, "fused")
    _ops.keep_mask(seed, (T, Kd), p, "cpu")
    return records


def _worker(arch, shard, n_shards):
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:
        _skip(f"triton (or a triton internal this test relies on) is missing: {exc}")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        _skip("triton has no NVIDIA backend")
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # no bundled or system ptxas
        _skip(f"ptxas not available: {exc}")
    if not ptxas or not os.path.exists(ptxas):
        _skip("ptxas not available")

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jobs = {}
    for name, fn, args, kwargs, configs in _record_launches():
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        for i, cfg in enumerate(configs):
            # The same keyword set JITFunction.run passes to the binder.
            kw = dict(kwargs, **cfg.all_kwargs(), debug=False,
                      instrumentation_mode=knobs.compilation.instrumentation_mode,
                      fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
            bound, spec, opts = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            variant = repr((sorted(signature.items()),
                            sorted((k, v) for k, v in constexprs.items()
                                   if fn.arg_names[k[0]] not in cfg.kwargs), sorted(attrs.items())))
            key = (variant, repr(sorted(cfg.all_kwargs().items())))
            jobs.setdefault(key, (fn, variant, i, signature, constexprs, attrs, options))

    results = []
    for n, (fn, variant, i, signature, constexprs, attrs, options) in enumerate(jobs.values()):
        if n % n_shards != shard:
            continue
        rec = {"kernel": fn.__name__, "variant": variant, "config": i,
               "types": {k: v for k, v in signature.items() if v.startswith("*")}}
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            ptx = kernel.asm["ptx"]
            rec.update(ok=True, shared=kernel.metadata.shared, cubin_bytes=len(kernel.asm["cubin"]),
                       ptx_has_entry=f".entry {fn.__name__}" in ptx, wgmma="wgmma" in ptx,
                       target=ptx.split(".target", 1)[1].split()[0].rstrip(","))
        except Exception as exc:  # reported, with the kernel and config, by the test
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-3000:]}")
        results.append(rec)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
