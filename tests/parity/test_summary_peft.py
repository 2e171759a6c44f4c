"""lora_layers.summary against PEFT: the trainable and total parameter counts, and the line PEFT's
print_trainable_parameters writes. The other summary tests are in tests/model/test_summary.py."""
import pytest
from conftest import make_tiny_phi3

import lora_layers as L

peft = pytest.importorskip("peft")


def test_counts_match_peft_print_trainable_parameters():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                             rank_pattern={"model.layers.1.mlp.down_proj": 2})
    trainable, total = peft.get_peft_model(make_tiny_phi3(), config).get_nb_trainable_parameters()

    model = make_tiny_phi3()
    L.inject_lora(model, ["o_proj", "down_proj"], r=4, lora_alpha=8,
                  rank_pattern={r"model\.layers\.1\.mlp\.down_proj": 2})
    s = L.summary(model)

    assert (s.trainable_params, s.total_params) == (trainable, total)
    pct = 100 * trainable / total
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}" in str(s)
