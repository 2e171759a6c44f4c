"""GPU memory per process for LoRA fine-tuning of Phi-3 under FSDP2 and DDP: the table of docs/distributed.md.

    python examples/fsdp_memory.py

Arithmetic, not a measurement; the assumptions (printed under the table):

- LoRA r=16 on qkv_proj, o_proj, gate_up_proj and down_proj (lora_layers.phi3.apply_lora's defaults: q, k and
  v, and gate and up, each get their own rank-16 adapter), fp32 adapters (lora_dtype=float32);
- AdamW: fp32 gradients and two fp32 states per adapter parameter; FSDP2 shards the adapters, their
  gradients and the optimizer state with the base, DDP keeps all of them on every GPU;
- the base in bf16 (2 bytes a weight), or NF4 for the four projections (torchao, blocks of 64: 4 bits, an
  8-bit scale per block and a 32-bit scale per 256 blocks) with the embeddings, lm_head and norms in bf16;
- FSDP2 sharded per decoder layer (lora_layers.phi3.fully_shard): the root (embeddings, lm_head, final
  norm) stays gathered from forward to backward, and two decoder layers are gathered at a time (the one
  computing and the one prefetched);
- activations for 1 sequence of 2048 tokens per GPU, bf16, gradient checkpointing per decoder layer: each
  layer's input kept (2·s·h bytes), and one layer's activations while it is recomputed, 34·s·h bytes
  (Korthikanti et al. 2022, attention by SDPA/flash: no s² term); lean mode's fused loss never holds the
  logits. CUDA's context, the allocator's fragmentation and temporary buffers come on top (1-2 GiB).
"""
from __future__ import annotations

GiB = 2 ** 30
RANK, SEQUENCE, BATCH = 16, 2048, 1
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # a weight's share of the packed bytes, scales included
#: Sizes of transformers' Phi3Config for each model (the hub's config.json).
MODELS = {
    "Phi-3-mini (3.8B)": dict(hidden=3072, layers=32, heads=32, kv_heads=32, head_dim=96, intermediate=8192,
                              vocab=32064),
    "Phi-3-medium (14B)": dict(hidden=5120, layers=40, heads=40, kv_heads=10, head_dim=128, intermediate=17920,
                               vocab=32064),
}


def projections(m):
    """{name: (in_features, [out_features of each part with its own adapter])} of one decoder layer."""
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    return {"qkv_proj": (m["hidden"], [q, kv, kv]), "o_proj": (q, [m["hidden"]]),
            "gate_up_proj": (m["hidden"], [m["intermediate"]] * 2), "down_proj": (m["intermediate"], [m["hidden"]])}


def counts(m):
    """Parameter counts: the four projections and the rest of one layer, the root's, the adapters (all layers)."""
    layer = projections(m)
    proj = sum(n_in * sum(outs) for n_in, outs in layer.values())
    lora = sum(RANK * (n_in + out) for n_in, outs in layer.values() for out in outs)
    return dict(proj=proj, layer_norms=2 * m["hidden"], root=2 * m["vocab"] * m["hidden"] + m["hidden"],
                lora=lora * m["layers"])


def per_gpu(m, base, gpus, fsdp=True):
    """{item: bytes} on one GPU: base shard, gathered weights, adapters with gradients and AdamW, activations."""
    c, bf16 = counts(m), 2
    proj_bytes = c["proj"] * (NF4_BYTES if base == "nf4" else bf16)
    layer_bytes = proj_bytes + c["layer_norms"] * bf16
    base_bytes = m["layers"] * layer_bytes + c["root"] * bf16
    shards = gpus if fsdp else 1
    return {"base": base_bytes / shards,
            "gathered": (c["root"] * bf16 + 2 * layer_bytes) * (1 - 1 / shards) if fsdp else 0,
            "adapters": c["lora"] * (4 + 4 + 8) / shards,
            "activations": BATCH * SEQUENCE * m["hidden"] * bf16 * (m["layers"] + 17)}


def table():
    """The markdown table of docs/distributed.md, in GiB per GPU."""
    lines = ["| model | base | GPUs | base/N | gathered | adapters + grads + AdamW | activations | FSDP2 total "
             "| DDP total |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in MODELS.items():
        for base in ("bf16", "nf4"):
            ddp = sum(per_gpu(m, base, 1, fsdp=False).values())
            for gpus in (2, 4, 8):
                items = per_gpu(m, base, gpus)
                cells = [f"{items[k] / GiB:.2f}" for k in ("base", "gathered", "adapters", "activations")]
                lines.append(f"| {name} | {base} | {gpus} | " + " | ".join(cells)
                             + f" | **{sum(items.values()) / GiB:.2f}** | {ddp / GiB:.2f} |")
    return "\n".join(lines)


def totals():
    """{model: (all parameters, adapter parameters)}."""
    out = {}
    for name, m in MODELS.items():
        c = counts(m)
        out[name] = (m["layers"] * (c["proj"] + c["layer_norms"]) + c["root"], c["lora"])
    return out


if __name__ == "__main__":
    print(table())
    print()
    for name, (params, lora) in totals().items():
        print(f"{name}: {params:,} parameters; r={RANK} adapters {lora:,} ({100 * lora / params:.2f}%)")
