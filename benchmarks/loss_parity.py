"""Loss-curve parity: lora_layers trains exactly like PEFT.

A tiny random Phi-3 is trained for 20 steps twice, from identical base weights:
once with PEFT (``get_peft_model``), once with lora_layers (``inject_lora`` on the
same four projections, one plain LoRA ``Linear`` each) after copying PEFT's
initial A/B into it. fp32, dropout 0, the same batches and the same AdamW. The
two loss curves must agree within ``--tol`` (1e-5) at every step.

Usage::

    python benchmarks/loss_parity.py            # prints both curves, exits 1 on a mismatch
    python benchmarks/loss_parity.py --lean     # phi3.apply_lora: plain vs lean (enable_lean)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def tiny_phi3(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, layers: int = 2,
              intermediate_size: int = 96, heads: int = 4, kv_heads: int = 2):
    """A small random ``Phi3ForCausalLM`` in fp32, built offline (GQA by default)."""
    import transformers

    config = transformers.Phi3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.Phi3ForCausalLM(config)


def _train(model: torch.nn.Module, batches: Sequence[torch.Tensor], lr: float) -> List[float]:
    params = C.trainable(model)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_parity(make_model: Callable[[], torch.nn.Module] = tiny_phi3, steps: int = 20, r: int = 8,
               lora_alpha: float = 16, lr: float = 1e-2, batch: int = 4, seq: int = 32, n_batches: int = 2,
               targets: Sequence[str] = C.PHI3_TARGETS, seed: int = 0) -> Dict[str, object]:
    """Train PEFT and lora_layers side by side; return both loss curves.

    Args:
        make_model: builds the (random, fp32) base model; called once, then copied.
        steps: optimizer steps (one batch each).
        r, lora_alpha: adapter rank and alpha (dropout is 0).
        lr: AdamW learning rate (default weight decay).
        batch, seq: random token batches of this shape (labels = inputs).
        n_batches: distinct batches, cycled over the steps.
        targets: module-name suffixes to adapt.
        seed: for the data.

    Returns:
        ``{"peft": [...], "lora_layers": [...], "max_abs_diff": float, "modules": int,
        "trainable": {"peft": n, "lora_layers": n}, "adapter_max_abs": float}`` where the last is
        the largest ``|B|`` of lora_layers after training (0 would mean nothing trained).
    """
    from lora_layers import lora_modules
    from lora_layers.surgery import inject_lora

    base = make_model().float()
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    # A few fixed batches, cycled: the adapters can fit them, so the loss really
    # moves and the comparison is not between two flat curves.
    pool = [torch.randint(3, vocab, (batch, seq), generator=gen) for _ in range(n_batches)]
    data = [pool[i % n_batches] for i in range(steps)]

    torch.manual_seed(seed)
    peft_model = C.peft_lora(copy.deepcopy(base), targets, r, lora_alpha, 0.0)
    ours = copy.deepcopy(base)
    inject_lora(ours, list(targets), r=r, lora_alpha=lora_alpha, lora_dropout=0.0)
    modules = C.copy_peft_init(peft_model, ours)

    curves = {"peft": _train(peft_model, data, lr), "lora_layers": _train(ours, data, lr)}
    diff = max(abs(a - b) for a, b in zip(curves["peft"], curves["lora_layers"]))
    moved = max(m.lora_B.detach().abs().max().item() for _, m in lora_modules(ours))
    return {**curves, "max_abs_diff": diff, "modules": modules, "adapter_max_abs": moved,
            "trainable": {"peft": sum(p.numel() for p in C.trainable(peft_model)),
                          "lora_layers": sum(p.numel() for p in C.trainable(ours))}}


def run_lean_parity(make_model: Callable[[], torch.nn.Module] = tiny_phi3, steps: int = 20, r: int = 8,
                    lora_alpha: float = 16, lr: float = 1e-2, batch: int = 4, seq: int = 32, n_batches: int = 2,
                    seed: int = 0) -> Dict[str, object]:
    """Train ``phi3.apply_lora`` twice from the same adapters, plain and lean; return both loss curves.

    The lean copy (``phi3.enable_lean``: recomputed adapter inputs, fused
    linear cross-entropy) differs only in the loss's rounding, so the curves
    should agree to fp32 rounding. Half of each sequence is masked out of the
    labels (-100, as a prompt is), so the fused loss also skips tokens.

    Returns:
        ``{"plain": [...], "lean": [...], "max_abs_diff": float}``.
    """
    from lora_layers import phi3

    base = make_model().float()
    gen = torch.Generator().manual_seed(seed)
    pool = [torch.randint(3, base.config.vocab_size, (batch, seq), generator=gen) for _ in range(n_batches)]
    torch.manual_seed(seed)
    phi3.apply_lora(base, r=r, lora_alpha=lora_alpha, lora_dropout=0.0)
    lean = copy.deepcopy(base)
    phi3.enable_lean(lean)
    curves = {}
    for name, model in (("plain", base), ("lean", lean)):
        opt = torch.optim.AdamW(C.trainable(model), lr=lr)
        model.train()
        curves[name] = []
        for step in range(steps):
            ids = pool[step % n_batches]
            labels = ids.clone()
            labels[:, :seq // 2] = -100
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[name].append(loss.item())
    return {**curves, "max_abs_diff": max(abs(a - b) for a, b in zip(curves["plain"], curves["lean"]))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the curves as JSON here")
    ap.add_argument("--lean", action="store_true", help="compare phi3.apply_lora plain vs lean instead of PEFT")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    machine = C.machine_info()
    if args.lean:
        res = run_lean_parity(steps=args.steps, r=args.r, lora_alpha=args.alpha, lr=args.lr)
        rows = [[i, f"{a:.7f}", f"{b:.7f}", f"{abs(a - b):.1e}"]
                for i, (a, b) in enumerate(zip(res["plain"], res["lean"]))]
        print(C.markdown_table(["step", "lora_layers loss", "lora_layers lean loss", "|diff|"], rows))
        print(f"\nmax |diff| = {res['max_abs_diff']:.2e} (tolerance {args.tol:g})")
        C.finish(res, argv, args.out, machine)
        return 0 if res["max_abs_diff"] <= args.tol else 1
    res = run_parity(steps=args.steps, r=args.r, lora_alpha=args.alpha, lr=args.lr)
    rows = [[i, f"{a:.7f}", f"{b:.7f}", f"{abs(a - b):.1e}"]
            for i, (a, b) in enumerate(zip(res["peft"], res["lora_layers"]))]
    print(C.markdown_table(["step", "PEFT loss", "lora_layers loss", "|diff|"], rows))
    print(f"\nmodules: {res['modules']}, trainable: {res['trainable']}, max |diff| = {res['max_abs_diff']:.2e} "
          f"(tolerance {args.tol:g})")
    C.finish(res, argv, args.out, machine)
    return 0 if res["max_abs_diff"] <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
