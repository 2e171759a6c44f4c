"""Which weight shapes bitsandbytes' CPU kernels read wrongly (the reason for lora_layers' refusal of 4-bit
bitsandbytes rows that are not whole blocks on CPU). No timing.

For each quant type, block size, compute dtype, out_features and in_features: quantize a random weight with
``bitsandbytes.functional.quantize_4bit`` on CPU, then compare ``dequantize_4bit`` and ``matmul_4bit`` with a
float64 reference that reads the same packed codes and scales (the 16 code values times the block's absmax),
and say whether the packed codes are those a float64 quantizer picks. Prints one line per in_features that is
read wrongly, and a summary; with ``--int8``, LLM.int8 against a float64 row-wise absmax quantizer.

    python benchmarks/bnb_cpu_rows.py             # the 4-bit grid (about a minute on one core)
    python benchmarks/bnb_cpu_rows.py --int8
"""
import argparse
import warnings

import torch


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def code_values(data, code, n):
    """The code values of the first ``n`` weights packed in ``data``: two 4-bit codes per byte, high nibble first."""
    flat = data.flatten()
    return code.double()[torch.stack([flat >> 4, flat & 15], 1).flatten().long()[:n]]


def read_codes(data, absmax, code, block, shape):
    """The weight the packed bytes stand for: blocks of ``block`` consecutive weights of the flattened matrix,
    code values times their block's absmax."""
    n = shape[0] * shape[1]
    vals = torch.cat([code_values(data, code, n), torch.zeros((-n) % block, dtype=torch.float64)]).view(-1, block)
    return (vals * absmax.double()[:, None]).reshape(-1)[:n].view(shape)


def nearest_codes(w, code, block):
    """A float64 quantizer's pick: per block of ``block`` flattened weights, the code value nearest to w/absmax."""
    flat = w.double().reshape(-1)
    blocks = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).view(-1, block)
    norm = blocks / blocks.abs().amax(1, keepdim=True)
    return code.double()[(norm[..., None] - code.double()).abs().argmin(-1)].reshape(-1)[:flat.numel()]


def check_4bit(bnb, bf, quant_type, block, dtype, out, in_features):
    w = torch.randn(out, in_features)
    data, state = bf.quantize_4bit(w, blocksize=block, quant_type=quant_type, compress_statistics=False)
    state.dtype = dtype
    ref = read_codes(data, state.absmax, state.code, block, w.shape)
    codes_ok = torch.equal(code_values(data, state.code, w.numel()), nearest_codes(w, state.code, block))
    x = torch.randn(3, in_features, dtype=dtype)
    return {"codes_ok": codes_ok, "dequantize": rel(bf.dequantize_4bit(data, state), ref),
            "matmul": rel(bnb.matmul_4bit(x, data, quant_state=state), x.double() @ ref.t()),
            "vs_float": rel(bf.dequantize_4bit(data, state), w), "ref_vs_float": rel(ref, w)}


def grid_4bit(bnb, bf, widths):
    wrong = {}
    for quant_type in ("nf4", "fp4"):
        for block in (32, 64, 128, 256):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                for out in (3, 64):
                    for in_features in widths:
                        r = check_4bit(bnb, bf, quant_type, block, dtype, out, in_features)
                        if max(r["dequantize"], r["matmul"]) > tol:
                            wrong.setdefault((quant_type, block), set()).add(in_features)
                        if block == 64 and dtype == torch.float32 and out == 64 and in_features in (48, 64, 96, 128):
                            print(f"{quant_type} block 64 fp32 ({out}, {in_features}): codes as float64 picks them: "
                                  f"{r['codes_ok']}; dequantize vs reference {r['dequantize']:.2e}, matmul "
                                  f"{r['matmul']:.2e}; vs the float weight {r['vs_float']:.3f} (reference "
                                  f"{r['ref_vs_float']:.3f})")
    for (quant_type, block), bad in sorted(wrong.items()):
        rule = all((n % 16 == 0 and n % block != 0) for n in bad)
        print(f"{quant_type} block {block:3d}: wrong for in_features {sorted(bad)}; all multiples of 16 and not of "
              f"the block: {rule}")


def grid_int8(bnb, bf, widths):
    worst = {True: 0.0, False: 0.0}  # rows that 4-bit reads wrongly (multiples of 16, not of 64), the others
    for out in (3, 64):
        for in_features in widths:
            w = torch.randn(out, in_features)
            q = bnb.nn.Linear8bitLt(in_features, out, bias=False, has_fp16_weights=False)
            q.load_state_dict({"weight": w})
            q = q.to("cpu")
            scale = w.double().abs().amax(1, keepdim=True) / 127
            ref = torch.round(w.double() / scale) * scale
            group = in_features % 16 == 0 and in_features % 64 != 0
            worst[group] = max(worst[group], rel(bf.int8_vectorwise_dequant(q.weight.data, q.weight.SCB), ref))
    print(f"LLM.int8, in_features {widths[0]}..{widths[-1]}: largest relative difference of the dequantized weight "
          f"from float64 row-wise absmax quantization: {worst[True]:.2e} where 4-bit is misread (multiples of 16, "
          f"not of 64), {worst[False]:.2e} elsewhere")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--int8", action="store_true", help="check LLM.int8 instead of the 4-bit types")
    p.add_argument("--max-in", type=int, default=300, help="the widest in_features checked (even widths from 2)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, CPU")
    widths = list(range(2, args.max_in + 1, 2))
    (grid_int8 if args.int8 else grid_4bit)(bnb, bf, widths)


if __name__ == "__main__":
    main()
