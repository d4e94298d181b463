"""Config: every YAML preset, round-trips, validation errors, overrides, and train.py's CLI."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml

from ttt_jax import (TTTLM, ModelConfig, RunConfig, TTTConfig, TTTLayer, apply_overrides,
                     from_dict, load_config, save_config, to_dict)

REPO = Path(__file__).resolve().parents[1]
# TTT-LM presets; the Moshi-TTT ones (and the bare ttt: block) are tests/test_moshi_config.py's.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                 if not p.stem.startswith(("moshi", "ttt_with_rope_example")))
TINY = REPO / "configs" / "tiny.yaml"

# A minimal valid YAML document, as a plain mapping.
BASE = {
    "model": {
        "vocab_size": 64,
        "num_layers": 1,
        "intermediate_size": 32,
        "ttt": {"model_dim": 16, "num_heads": 2, "mini_batch_size": 4},
    }
}


def base(**ttt):
    data = copy.deepcopy(BASE)
    data["model"]["ttt"].update(ttt)
    return data


# The presets the README names, by the name ``--config`` takes.
README_PRESETS = {"tiny", "tiny_mlp_rope", "moshi_ttt_tiny", "moshi_ttt_7b",
                  *(f"ttt_{k}_{s}" for k in ("linear", "mlp") for s in ("125m", "350m", "760m", "1.3b")),
                  *(f"experiments/{task}_{kind}" for task in ("bytes", "recall")
                    for kind in ("swa", "ttt_norope", "ttt_rope_bounded", "ttt_rope_unbounded"))}


def test_configs_exist():
    """``configs/`` is the package's preset directory; every run YAML there is a preset that
    ``--config NAME`` finds, the README's presets are all there, and ``tiny`` is what the README
    says it is (byte-level, 2 layers, d=128)."""
    from ttt_jax.cli import presets

    assert (REPO / "configs").resolve() == presets.PRESET_DIR
    on_disk = {p.relative_to(presets.PRESET_DIR).with_suffix("").as_posix()
               for p in presets.PRESET_DIR.rglob("*.yaml")} - set(presets.NOT_RUNS)
    assert set(presets.names()) == on_disk
    assert README_PRESETS <= on_disk, sorted(README_PRESETS - on_disk)
    for name in on_disk:
        assert presets.resolve(name) == presets.PRESET_DIR / f"{name}.yaml"
    tiny = load_config(TINY)
    assert presets.load("tiny") == tiny
    assert (tiny.data.source, tiny.model.vocab_size, tiny.model.num_layers,
            tiny.model.ttt.model_dim) == ("bytes", 256, 2, 128)


# ---------------------------------------------------------------- presets


def expected_param_count(model: dict) -> int:
    """Parameter count from the YAML's numbers alone (docs/architecture.md §1-2), written out term by term."""
    ttt = model["ttt"]
    v, n_layers, inter = model["vocab_size"], model["num_layers"], model["intermediate_size"]
    d, h = ttt["model_dim"], ttt["num_heads"]
    f = d // h
    b = ttt.get("mini_batch_size", 16)
    k = ttt.get("conv_kernel", 4)
    mlp = ttt.get("ttt_layer_type", "linear") == "mlp"
    share_qk = ttt.get("share_qk", False)

    ttt_params = 3 * d * d  # q_proj, v_proj, o_proj
    ttt_params += 2 * (k * d + d) if share_qk else d * d  # conv_q + conv_k, or k_proj
    ttt_params += d * d if ttt.get("use_gate", False) else 0  # g_proj
    ttt_params += 2 * d  # post_norm scale, bias
    ttt_params += h * d + h  # learnable_ttt_lr weight, bias
    ttt_params += b  # learnable_token_idx
    ttt_params += 2 * h * f  # ttt_norm weight, bias
    if mlp:
        ttt_params += h * (f * 4 * f + 4 * f) + h * (4 * f * f + f)  # W1 b1 W2 b2
    else:
        ttt_params += h * (f * f + f)  # W1 b1
    block = ttt_params + 2 * d + 3 * d * inter  # seq_norm, ffn_norm, SwiGLU
    if model.get("pre_conv", False):
        block += d + k * d + d  # norm, conv kernel, conv bias
    total = v * d + n_layers * block + d  # embed, blocks, final norm
    if not model.get("tie_word_embeddings", True):
        total += d * v  # lm_head
    return total


def plausible_range(name: str) -> tuple[float, float]:
    """A size in the file name (``_125m``, ``_1.3b``) bounds the count; otherwise a tiny model."""
    m = re.search(r"_(\d+(?:\.\d+)?)([mb])$", name)
    if not m:
        return 1.0, 5e6
    nominal = float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)
    return 0.64 * nominal, 1.6 * nominal


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_yaml_parses_round_trips_and_builds(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and isinstance(cfg.model.ttt, TTTConfig)

    out = tmp_path / path.name
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert from_dict(RunConfig, to_dict(cfg)) == cfg

    model = TTTLM(cfg.model)
    tokens = jax.ShapeDtypeStruct((1, cfg.model.ttt.mini_batch_size), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    count = sum(x.size for x in jax.tree.leaves(shapes))
    raw = yaml.safe_load(path.read_text())["model"]
    assert count == expected_param_count(raw)
    lo, hi = plausible_range(path.stem)
    assert lo <= count <= hi, f"{path.name}: {count:,} params outside [{lo:,.0f}, {hi:,.0f}]"


def test_param_count_formula_sees_options():
    """The independent formula tracks every option that changes the tree (checked by eval_shape)."""
    for ttt, extra in [({"share_qk": True, "use_gate": True, "ttt_layer_type": "mlp"},
                        {"pre_conv": True, "tie_word_embeddings": False}),
                       ({"conv_kernel": 3, "share_qk": True}, {"pre_conv": True})]:
        data = base(**ttt)
        data["model"].update(extra)
        cfg = from_dict(RunConfig, data)
        tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
        shapes = jax.eval_shape(TTTLM(cfg.model).init, jax.random.PRNGKey(0), tokens)
        assert sum(x.size for x in jax.tree.leaves(shapes)) == expected_param_count(data["model"])


# ---------------------------------------------------------------- YAML-level errors


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("where", ["top", "model", "ttt"])
def test_unknown_key_rejected(tmp_path, where):
    data = copy.deepcopy(BASE)
    target = {"top": data, "model": data["model"], "ttt": data["model"]["ttt"]}[where]
    target["surprise_key"] = 1
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match="surprise_key") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("dotted, value", [
    ("model.ttt.num_heads", "8"),
    ("model.ttt.use_rope", "yes"),
    ("model.ttt.rope_theta", "big"),
    ("model.vocab_size", 3.5),
    ("model.ttt", 5),
])
def test_wrong_type_names_dotted_field(dotted, value):
    data = copy.deepcopy(BASE)
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=re.escape(dotted)):
        from_dict(RunConfig, data)


@pytest.mark.parametrize("dotted", ["model", "model.vocab_size", "model.ttt.model_dim",
                                    "model.ttt.num_heads"])
def test_missing_required_key_named(dotted):
    data = copy.deepcopy(BASE)
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    del node[leaf]
    with pytest.raises(ValueError, match=f"missing.*{re.escape(dotted)}"):
        from_dict(RunConfig, data)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- validation


# (kwargs, substrings that must all appear in the message: the field first, then what is allowed).
BAD_TTT = [
    ({"mini_batch_size": 0}, ["mini_batch_size", "positive integer"]),
    ({"mini_batch_size": -4}, ["mini_batch_size", "positive integer"]),
    ({"ttt_layer_type": "rnn"}, ["ttt_layer_type", "'linear'", "'mlp'"]),
    ({"rope_layout": "rotate"}, ["rope_layout", "'interleaved'", "'half'"]),
    ({"model_dim": 6, "num_heads": 2, "use_rope": True}, ["head_dim", "even", "use_rope"]),
    ({"num_heads": 3}, ["num_heads", "divisor of model_dim"]),
    ({"scan_checkpoint_group": -1}, ["scan_checkpoint_group", ">= 0"]),
    ({"seq_chunk": -1}, ["seq_chunk", ">= 0"]),
    ({"seq_chunk": 1.5}, ["seq_chunk", "integer"]),
    ({"rope_theta": 0.0}, ["rope_theta", "positive"]),
    ({"rope_theta": -10000.0}, ["rope_theta", "positive"]),
    ({"ttt_base_lr": 0.0}, ["ttt_base_lr", "positive"]),
    ({"ttt_base_lr": -1.0}, ["ttt_base_lr", "positive"]),
]


@pytest.mark.parametrize("kwargs, words", BAD_TTT, ids=lambda x: str(x))
def test_bad_ttt_config(kwargs, words):
    args = {"model_dim": 16, "num_heads": 2, **kwargs}
    with pytest.raises(ValueError) as info:
        TTTConfig(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    # The same value in YAML fails too, with the same message.
    with pytest.raises(ValueError, match=re.escape(words[0])):
        from_dict(RunConfig, base(**kwargs))


@pytest.mark.parametrize("seq_chunk, kind, span", [
    (0, "linear", 0), (2048, "mlp", 2048), (100, "linear", 96), (5, "mlp", 16),
    (None, "linear", 1024), (None, "mlp", 2048)])
def test_span_length_is_whole_mini_batches(seq_chunk, kind, span):
    cfg = TTTConfig(model_dim=16, num_heads=2, ttt_layer_type=kind, seq_chunk=seq_chunk)
    assert cfg.span_length == span


def test_odd_head_dim_fine_without_rope():
    assert TTTConfig(model_dim=6, num_heads=2).head_dim == 3


@pytest.mark.parametrize("dtype", ["float16", "bf16", "int8"])
def test_bad_dtype(dtype):
    ttt = TTTConfig(model_dim=16, num_heads=2)
    with pytest.raises(ValueError) as info:
        ModelConfig(vocab_size=8, num_layers=1, intermediate_size=8, ttt=ttt, dtype=dtype)
    for word in ("dtype", "'float32'", "'bfloat16'"):
        assert word in str(info.value)
    data = copy.deepcopy(BASE)
    data["model"]["dtype"] = dtype
    with pytest.raises(ValueError, match="model.dtype"):
        from_dict(RunConfig, data)


def test_bad_loss_chunk_names_the_field():
    ttt = TTTConfig(model_dim=16, num_heads=2)
    with pytest.raises(ValueError, match="loss_chunk"):
        ModelConfig(vocab_size=8, num_layers=1, intermediate_size=8, ttt=ttt, loss_chunk=-1)
    data = copy.deepcopy(BASE)
    data["model"]["loss_chunk"] = "all"
    with pytest.raises(ValueError, match="model.loss_chunk"):
        from_dict(RunConfig, data)


def test_wrong_input_width_for_layer(tiny_ttt_config):
    layer = TTTLayer(tiny_ttt_config)
    x = jax.ShapeDtypeStruct((2, 8, tiny_ttt_config.model_dim // 2), jnp.float32)
    with pytest.raises(ValueError, match="model_dim"):
        jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)


def test_float_tokens_rejected(tiny_model_config):
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="integer"):
        jax.eval_shape(TTTLM(tiny_model_config).init, jax.random.PRNGKey(0), tokens)


# ---------------------------------------------------------------- overrides and defaults


def test_apply_overrides():
    cfg = load_config(TINY)
    assert cfg.model.ttt.use_rope  # tiny.yaml: RoPE on, as in ttt-lm-pytorch
    new = apply_overrides(cfg, ["model.ttt.use_rope=false", "model.num_layers=3"])
    expected = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, num_layers=3,
                                       ttt=dataclasses.replace(cfg.model.ttt, use_rope=False)))
    assert new == expected
    assert apply_overrides(cfg, []) == cfg


@pytest.mark.parametrize("override, word", [
    ("model.ttt.no_such_key=1", "no_such_key"),
    ("model.nothing.use_rope=true", "nothing"),
    ("model.ttt.use_rope", "key.sub=value"),
    ("model.ttt.num_heads=abc", "model.ttt.num_heads"),
    ("model.ttt.ttt_layer_type=rnn", "ttt_layer_type"),
])
def test_bad_override(override, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        apply_overrides(load_config(TINY), [override])


def test_use_rope_false_equals_omitted():
    omitted = from_dict(RunConfig, base())
    explicit = from_dict(RunConfig, base(use_rope=False))
    assert omitted == explicit
    assert omitted.model.ttt.use_rope is False


def test_rope_theta_defaults_to_10000():
    cfg = from_dict(RunConfig, base(use_rope=True))
    assert cfg.model.ttt.rope_theta == 10000.0
    assert cfg == from_dict(RunConfig, base(use_rope=True, rope_theta=10000.0))
    assert isinstance(from_dict(RunConfig, base(rope_theta=500)).model.ttt.rope_theta, float)


# ---------------------------------------------------------------- train.py


def test_train_main_tiny(train_main, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert train_main(["--config", "configs/tiny.yaml", "--check"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert train_main(["--config", "configs/tiny.yaml", "--check",
                       "--set", "model.ttt.use_rope=true"]) == 0


def test_train_main_missing_file(train_main, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert train_main(["--config", "nonexistent.yaml"]) == 2
    assert "nonexistent.yaml" in capsys.readouterr().err


def test_train_main_bad_override(train_main, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert train_main(["--config", "configs/tiny.yaml", "--set", "model.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["use_rope", "qk_l2_norm", "share_qk", "use_gate"])
def test_switch_must_be_bool(field):
    # A string such as 'no' is truthy: accepting it would silently switch the option on.
    with pytest.raises(ValueError, match=f"ttt.{field}='no'.*true or false"):
        TTTConfig(model_dim=16, num_heads=2, **{field: "no"})


@pytest.mark.parametrize("field", ["pre_conv", "tie_word_embeddings"])
def test_model_switch_must_be_bool(field):
    ttt = TTTConfig(model_dim=16, num_heads=2)
    with pytest.raises(ValueError, match=f"model.{field}=1.*true or false"):
        ModelConfig(vocab_size=8, num_layers=1, intermediate_size=8, ttt=ttt, **{field: 1})


def test_exponent_floats_read_as_numbers(tmp_path):
    # PyYAML's YAML 1.1 rules read `1e-5` (no dot) as a string; users write it that way.
    text = yaml.safe_dump(BASE).replace("vocab_size: 64", "vocab_size: 64\n  rms_norm_eps: 1e-5")
    path = tmp_path / "eps.yaml"
    path.write_text(text)
    assert load_config(path).model.rms_norm_eps == 1e-5
    cfg = apply_overrides(load_config(path), ["model.rms_norm_eps=2e-6", "model.ttt.rope_theta=5e5"])
    assert cfg.model.rms_norm_eps == 2e-6 and cfg.model.ttt.rope_theta == 500000.0
    assert isinstance(cfg.model.num_layers, int)
