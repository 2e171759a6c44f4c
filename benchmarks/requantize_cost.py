"""What merging a QLoRA adapter into its 4-bit base and requantizing costs in accuracy (issue #25 item 4).

Reads a run of the example trained over an NF4 base (its ``base_model/`` and ``lora_adapter.safetensors``) and
prints the loss on held-out synthetic reversal chats (a seed the run never saw) of:
the base alone (float, and NF4), the adapter served unmerged over the NF4 base (the trained function), the
exact merge (``merge_and_unload``: dense), and the merge requantized (``merge_and_unload(requantize=...)``),
with the requantize report's summary figures. No timing.

    python examples/phi3_finetune.py --quantize nf4 --merge --max-steps 50 --output-dir runs/nf4
    python benchmarks/requantize_cost.py runs/nf4
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import phi3_data  # noqa: E402  (the example's synthetic task and chat tokenization)

import lora_layers as L  # noqa: E402


def build(run_dir, quantize=True, adapter=True):
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(os.path.join(run_dir, "base_model"), dtype=torch.float32)
    if quantize:
        L.quantize_base(model)
    if adapter:
        L.load_adapter(model, os.path.join(run_dir, "lora_adapter.safetensors"))
    return model


def loss(model, batch):
    # bitsandbytes layers on their training path: an eval-mode Linear4bit on CPU repacks its weight (docs/phi3.md)
    for module in model.modules():
        module.training = type(module).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        return model(**batch).loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="an --output-dir of examples/phi3_finetune.py --quantize nf4")
    parser.add_argument("--chats", type=int, default=256, help="held-out synthetic chats (default 256)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.run_dir, "base_model"))
    chats = phi3_data.synthetic_reversal(args.chats, seed=1234)
    batch = phi3_data.collate([phi3_data.tokenize_chat(tokenizer, c, 256) for c in chats], tokenizer.pad_token_id)
    probe = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rows = [("float base, no adapter", loss(build(args.run_dir, quantize=False, adapter=False), batch)),
            ("nf4 base, no adapter", loss(build(args.run_dir, adapter=False), batch)),
            ("nf4 base + adapter, unmerged (trained)", loss(build(args.run_dir), batch)),
            ("merge_and_unload (exact, dense)", loss(L.merge_and_unload(build(args.run_dir)), batch))]
    reports = {}
    for scheme in L.model.requantize.REQUANTIZE_SCHEMES:
        try:
            merged = L.merge_and_unload(build(args.run_dir), requantize=scheme, probe=probe)
        except ValueError as exc:  # bnb-nf4 on CPU refuses rows bitsandbytes' CPU kernels misread
            print(f"requantize={scheme!r}: refused: {exc}")
            continue
        reports[scheme] = merged.requantize_report
        rows.append((f"merge_and_unload(requantize={scheme!r})", loss(merged, batch)))
    width = max(len(name) for name, _ in rows)
    print(f"loss on {args.chats} held-out reversal chats")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.4f}")
    for scheme, report in reports.items():
        errors = [row.error for row in report.layers]
        deltas = [row.delta for row in report.layers]
        print(f"{scheme}: weight error {min(errors):.3f}-{max(errors):.3f} (adapter's change {min(deltas):.3f}-"
              f"{max(deltas):.3f}); max |logit difference| {report.max_logit_diff:.3f} (max |logit| "
              f"{report.max_logit:.3f})")
    return rows, reports


if __name__ == "__main__":
    main()
