"""The fused layer the DoRA tests share: GQA-like splits ``[q | k | v]`` of 8, 4 and 4 output rows,
with an adapter on q and v only (k, as in Phi-3's ``qkv=("q", "v")``, keeps the base rows)."""

GQA = dict(split_sizes=[8, 4, 4], enable=[True, False, True])
