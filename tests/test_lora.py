"""LoRA adapters (ttt_jax/nn/lora.py) against a direct numpy computation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ttt_jax.nn.lora import LoRAConfig, LoRADense, dense, has_lora, is_lora_path, merge


def test_adapter_output_is_x_w_plus_scaled_low_rank_product():
    layer = LoRADense(6, rank=3, scaling=0.5)
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    assert {k: v.shape for k, v in params.items()} == {"kernel": (5, 6), "lora_a": (5, 3),
                                                      "lora_b": (3, 6)}
    assert not np.any(params["lora_b"])  # a new adapter adds nothing
    assert np.abs(params["lora_a"]).max() <= 1 / np.sqrt(5)
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    want = x @ params["kernel"] + 0.5 * (x @ params["lora_a"]) @ params["lora_b"]
    got = layer.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    # merged: one kernel computing the same function, no adapter left
    merged = merge({"layer": params}, 0.5)["layer"]
    assert set(merged) == {"kernel"} and not has_lora({"layer": merged})
    np.testing.assert_allclose(x @ np.asarray(merged["kernel"]), want, rtol=1e-5, atol=1e-5)


def test_rank_zero_is_plain_dense():
    import flax.linen as nn

    x = np.ones((2, 5), np.float32)
    ours = LoRADense(4).init(jax.random.PRNGKey(0), x)["params"]
    theirs = nn.Dense(4, use_bias=False).init(jax.random.PRNGKey(0), x)["params"]
    assert set(ours) == set(theirs) == {"kernel"}
    np.testing.assert_array_equal(ours["kernel"], theirs["kernel"])


def test_targets_choose_layers_and_bad_values_name_the_key():
    cfg = LoRAConfig(enable=True, rank=2, targets=r"self_attn/in_proj")
    assert dense(8, cfg, "transformer/layers_0/self_attn", name="in_proj").rank == 2
    assert dense(8, cfg, "transformer/layers_0/self_attn", name="out_proj").rank == 0
    assert dense(8, LoRAConfig(enable=False), "a/self_attn", name="in_proj").rank == 0
    assert dense(8, None, "a/self_attn", name="in_proj").rank == 0
    assert is_lora_path("a/in_proj/lora_b") and not is_lora_path("a/in_proj/kernel")
    for kw, match in (({"rank": 0}, r"lora\.rank=0 is invalid"),
                      ({"dropout": 0.1}, r"lora\.dropout=0\.1 is invalid"),
                      ({"targets": "("}, r"lora\.targets='\(' is invalid")):
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**kw)
