"""LoRA variants, one file each: a different delta, init or row scale over the same core."""
