"""Model benchmark: one LoRA training step of a random Phi-3, PEFT vs lora_layers.

One step is forward + backward + ``AdamW.step()``. Three set-ups share the same
base weights (one seeded model, deep-copied) and the same initial adapters:

* ``peft``: ``get_peft_model`` on qkv_proj, o_proj, gate_up_proj, down_proj;
* ``lora_layers (inject_lora)``: the same structure, one plain LoRA ``Linear``
  per projection, with PEFT's initial A/B copied in;
* ``lora_layers (phi3.apply_lora)``: ``MergedLinear`` on qkv (GQA splits) and
  gate_up (one rank-r adapter per split, so more parameters: reported separately);
* ``lora_layers lean``: a copy of the previous one after ``phi3.enable_lean``
  (recomputed adapter inputs, fused linear cross-entropy); ``frozen lean``: a
  copy of the floor (below) with the fused loss.

With ``--quantize nf4`` (or ``fp4``, ``int8``) the base is QLoRA's: the random
model is saved and reloaded with a ``BitsAndBytesConfig`` (4-bit blocks
computing in the run's dtype), and every set-up, PEFT's included, wraps the same
bitsandbytes layers.

B starts at zero everywhere, so the first loss is the base model's loss in
every set-up (printed as a check). Reported, in one process and interleaved: the step
time median as a ratio to PEFT, the bytes autograd saves for backward in one
step (beyond parameters and inputs; also minus the same model without
adapters, the *floor*, which isolates what the adapters add), the peak memory growth during a step
(sampled RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and the
trainable parameters.

Sizes: ``small`` (default; hidden 512, 4 layers, 8 heads / 4 KV heads,
intermediate 1376, vocab 32064, batch 4×256, fp32 on CPU); ``mini`` (the real
Phi-3-mini layer shapes: hidden 3072, 32 heads, intermediate 8192, vocab 32064,
2 layers by default, bf16; meant for ``--device cuda``); ``tiny`` (``--quick``).

Usage::

    python benchmarks/bench_phi3_step.py
    python benchmarks/bench_phi3_step.py --device cuda --size mini --layers 4
    python benchmarks/bench_phi3_step.py --quick
    python benchmarks/bench_phi3_step.py --quantize nf4     # QLoRA: PEFT vs lora_layers on one nf4 base
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from typing import Callable, Dict, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SIZES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, batch, seq, dtype
    # tiny: intermediate 128, whole 64-column blocks for bitsandbytes' CPU 4-bit kernels (bases/quantized.py)
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=256, batch=2, seq=16, dtype="fp32"),
    "small": dict(hidden=512, layers=4, heads=8, kv=4, inter=1376, vocab=32064, batch=4, seq=256, dtype="fp32"),
    "mini": dict(hidden=3072, layers=2, heads=32, kv=32, inter=8192, vocab=32064, batch=4, seq=256, dtype="bf16"),
}
FLOOR, PEFT, INJECT, PHI3 = ("frozen base (no adapters)", "peft", "lora_layers (inject_lora)",
                              "lora_layers (phi3.apply_lora)")
FLOOR_LEAN, LEAN = "frozen lean (fused loss)", "lora_layers lean (phi3.apply_lora, lean=True)"


QUANTIZE = ("nf4", "fp4", "int8")


def build_base(size: dict, device: str, dtype: torch.dtype, seed: int = 0, quantize: Optional[str] = None):
    """A random ``Phi3ForCausalLM`` of ``size`` on ``device`` in ``dtype``, train mode; with ``quantize``
    (one of :data:`QUANTIZE`), its projections are bitsandbytes layers (loaded as QLoRA loads a checkpoint)."""
    import transformers

    config = transformers.Phi3Config(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv"],
        max_position_embeddings=max(4096, size["seq"]), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).to(device=device, dtype=dtype)
    if quantize is not None:
        if quantize == "int8":
            bnb = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                                  bnb_4bit_compute_dtype=dtype)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = transformers.Phi3ForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype,
                                                                 device_map={"": torch.device(device)})
    return model.train()


def build_models(base, r: int, alpha: float, p: float, with_phi3: bool = True) -> Dict[str, torch.nn.Module]:
    """The three LoRA set-ups on deep copies of ``base`` (PEFT's init copied into inject_lora's)."""
    from lora_layers.surgery import inject_lora

    targets = list(C.PHI3_TARGETS)
    floor = copy.deepcopy(base).requires_grad_(False)
    # The floor: the same graph without adapters. Nothing in it needs a gradient,
    # so make the embedding output require one (as checkpointing recipes do) and
    # the whole backward through the frozen layers still runs.
    floor.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    torch.manual_seed(1)
    models = {FLOOR: floor, PEFT: C.peft_lora(copy.deepcopy(base), targets, r, alpha, p)}
    ours = copy.deepcopy(base)
    inject_lora(ours, targets, r=r, lora_alpha=alpha, lora_dropout=p)
    C.copy_peft_init(models[PEFT], ours)
    models[INJECT] = ours
    if with_phi3:
        try:
            from lora_layers import phi3
        except ImportError as exc:  # the preset is optional for this benchmark
            print(f"skipping {PHI3}: {exc}")
        else:
            helper = copy.deepcopy(base)
            phi3.apply_lora(helper, r=r, lora_alpha=alpha, lora_dropout=p)
            models[PHI3] = helper
            # The lean rows: the same weights and adapters as the floor and the phi3 row.
            models[FLOOR_LEAN] = copy.deepcopy(floor)
            phi3.enable_lean(models[FLOOR_LEAN])
            models[LEAN] = copy.deepcopy(helper)
            phi3.enable_lean(models[LEAN])
    for m in models.values():
        m.train()
    return models


def _step_fn(model, ids: torch.Tensor, losses: list) -> Callable[[], None]:
    params = C.trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # the floor has none

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
        losses.append(loss.item())
    return step


def _peak_growth(step: Callable[[], None], device: str) -> int:
    """Peak memory growth over the memory in use before one step."""
    if device.startswith("cuda"):
        return C.cuda_peak_growth(step)
    with C.PeakRSS() as rss:
        step()
    return rss.delta


def run(size: dict, device: str, dtype: torch.dtype, r: int, alpha: float, p: float, reps: int,
        warmup: int = 1, seed: int = 0, with_phi3: bool = True, quantize: Optional[str] = None) -> dict:
    """Measure the three set-ups; returns ``{"config", "results"}`` (see the module doc)."""
    base = build_base(size, device, dtype, seed, quantize)
    models = build_models(base, r, alpha, p, with_phi3)
    del base
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, size["vocab"], (size["batch"], size["seq"]), generator=gen).to(device)
    losses = {name: [] for name in models}
    steps = {name: _step_fn(m, ids, losses[name]) for name, m in models.items()}

    res = {}
    for name, m in models.items():
        # The first call is also the warm-up that creates AdamW's state.
        steps[name]()
        sb = C.saved_bytes(lambda: m(input_ids=ids, labels=ids).loss, exclude=[ids, *m.parameters()])
        res[name] = {"first_loss": losses[name][0], "saved_bytes": sb["bytes"],
                     "trainable_params": sum(t.numel() for t in C.trainable(m))}
    for name in models:
        res[name]["peak_growth_bytes"] = _peak_growth(steps[name], device)
    times = C.interleaved_times(steps, reps=reps, warmup=max(0, warmup - 1), device=torch.device(device))
    ref_t, ref_b = C.median(times[PEFT]), res[PEFT]["saved_bytes"]
    floor_b = res[FLOOR]["saved_bytes"]
    for name in models:
        extra = res[name]["saved_bytes"] - floor_b
        res[name].update(step_s=times[name], step_median_s=C.median(times[name]),
                         time_ratio=C.median(times[name]) / ref_t,
                         time_min_ratio=min(times[name]) / min(times[PEFT]),
                         saved_ratio=res[name]["saved_bytes"] / ref_b if ref_b else float("nan"),
                         adapter_saved_bytes=extra,
                         adapter_saved_ratio=extra / (ref_b - floor_b) if ref_b > floor_b else float("nan"),
                         peak_ratio=res[name]["peak_growth_bytes"] / res[PEFT]["peak_growth_bytes"]
                         if res[PEFT]["peak_growth_bytes"] else float("nan"))
    return {"config": {**size, "device": device, "dtype": str(dtype).split(".")[-1], "r": r, "alpha": alpha,
                       "dropout": p, "reps": reps, "quantize": quantize}, "results": res}


def table(result: dict, device: str) -> str:
    """The Markdown table of :func:`run`'s result."""
    mem = "peak GPU mem growth" if device.startswith("cuda") else "peak RSS growth (sampled)"
    rows = [[name, f"{f['time_ratio']:.3f}", f"{f['time_min_ratio']:.3f}", f"{f['step_median_s'] * 1e3:.0f}",
             C.fmt_bytes(f["saved_bytes"]),
             f"{f['saved_ratio']:.3f}", C.fmt_bytes(f["adapter_saved_bytes"]),
             "-" if name == FLOOR else f"{f['adapter_saved_ratio']:.3f}",
             C.fmt_bytes(f["peak_growth_bytes"]), f"{f['trainable_params']:,}",
             f"{f['first_loss']:.6f}"] for name, f in result["results"].items()]
    return C.markdown_table(["set-up", "step time / PEFT (median)", "(min)", "step ms (median)", "saved activations",
                             "saved / PEFT", "saved beyond floor", "beyond floor / PEFT's", mem,
                             "trainable params", "first loss"], rows)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (mini: 2-4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default=None, help="fp32/bf16/fp16 (default: the size's)")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--no-phi3", action="store_true", help="skip the phi3.apply_lora set-up")
    ap.add_argument("--quantize", choices=QUANTIZE, default=None,
                    help="QLoRA: a bitsandbytes base (4-bit nf4/fp4 computing in --dtype, or int8) for every set-up")
    C.add_common_args(ap, reps=7)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.reps = "tiny", 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    size = dict(SIZES[args.size])
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit(f"--layers must be >= 1, got {args.layers}")
        size["layers"] = args.layers
    dtype = C.parse_dtype(args.dtype or size.pop("dtype"))
    size.pop("dtype", None)
    C.set_threads(args.threads)

    machine = C.machine_info(args.device)
    result = run(size, args.device, dtype, args.rank, args.alpha, args.dropout, args.reps, args.warmup,
                 with_phi3=not args.no_phi3, quantize=args.quantize)
    c = result["config"]
    print(f"bench_phi3_step: {machine}")
    print(f"\nPhi-3 {args.size}: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv']} KV, "
          f"intermediate {c['inter']}, vocab {c['vocab']}, batch {c['batch']}x{c['seq']}, {c['dtype']}"
          f"{f' over a bitsandbytes {args.quantize} base' if args.quantize else ''}, "
          f"{args.device}; r={args.rank}, alpha={args.alpha:g}, dropout={args.dropout}; {args.reps} reps\n")
    print(table(result, args.device))
    first = {n: f["first_loss"] for n, f in result["results"].items()}
    print(f"\nfirst loss: {first}")
    return C.finish(result, argv, args.out, machine)


if __name__ == "__main__":
    main()
