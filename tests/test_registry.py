"""The architecture registry: one entry per architecture, features refused at config load by key,
one optimizer builder for every architecture, one checkpoint path resolver for every command."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from ttt_jax import registry
from ttt_jax.checkpoint import CHECKPOINT_DIR, resolve
from ttt_jax.config import OptimConfig, RunConfig, from_dict, load_config, to_dict
from ttt_jax.moshi.config import MoshiRunConfig, TTTArgs
from ttt_jax.training import decay_mask, make_optimizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_builtin_architectures_and_unknown_name():
    assert {"ttt_lm", "attention_lm", "moshi_ttt", "moshi_lm"} <= set(registry.names())
    for name in ("ttt_lm", "attention_lm", "moshi_ttt", "moshi_lm"):
        arch = registry.get(name)
        assert arch.name == name and set(arch.features) <= set(registry.FEATURES)
    with pytest.raises(ValueError, match=r"architecture='nope' is invalid: expected one of "
                                         r"'attention_lm', 'moshi_lm', 'moshi_ttt', 'ttt_lm'"):
        registry.get("nope")


def test_yaml_architecture_key_selects_the_run_config(tmp_path):
    assert type(load_config(CONFIGS / "tiny.yaml")) is RunConfig
    assert type(load_config(CONFIGS / "moshi_ttt_tiny.yaml")) is MoshiRunConfig
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    data["architecture"] = "rnn"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"bad.yaml: architecture='rnn' is invalid"):
        load_config(bad)


def test_attention_baseline_is_its_own_architecture():
    """``model.seq_modeling: swa`` alone (files written before the key) reads as attention_lm;
    ``architecture: attention_lm`` with a TTT sequence layer is refused by key."""
    base = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    base["model"]["seq_modeling"] = "swa"
    cfg = from_dict(RunConfig, base)
    assert cfg.architecture == "attention_lm" and registry.of(cfg).name == "attention_lm"
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    base["model"]["seq_modeling"] = "ttt"
    base["architecture"] = "attention_lm"
    with pytest.raises(ValueError, match=r"model.seq_modeling='ttt' is invalid: expected 'swa'"):
        from_dict(RunConfig, base)


@pytest.mark.parametrize("config, override, message", [
    ("experiments/bytes_swa.yaml", "train.diagnostics_every=5",
     r"train.diagnostics_every=5 is invalid: architecture 'attention_lm' does not support "
     r"diagnostics"),
    ("moshi_lm_tiny.yaml", "train.diagnostics_every=5",
     r"train.diagnostics_every=5 is invalid: architecture 'moshi_lm' does not support "
     r"diagnostics"),
])
def test_unsupported_feature_refused_at_check(config, override, message, train_main, capsys):
    code = train_main(["--config", str(CONFIGS / config), "--set", override, "--check"])
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_moshi_ttt_block_alias_base_lr():
    """The public Moshi-TTT key ``base_lr`` is read as ``ttt_base_lr``; giving both is refused."""
    assert from_dict(TTTArgs, {"base_lr": 0.5}, "ttt").ttt_base_lr == 0.5
    assert to_dict(from_dict(TTTArgs, {"base_lr": 0.5}, "ttt"))["ttt_base_lr"] == 0.5
    with pytest.raises(ValueError, match="ttt_base_lr or its alias base_lr, not both"):
        from_dict(TTTArgs, {"base_lr": 0.5, "ttt_base_lr": 0.5}, "ttt")


def test_one_optimizer_builder_groups_scales_and_frozen():
    """Group LR multipliers, frozen groups (no update, no weight decay) and clipping over the
    trained params only, checked against plain AdamW arithmetic on a two-leaf tree."""
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))},
              "c": {"kernel": jnp.ones((2, 2))}}
    grads = {"a": {"kernel": jnp.full((2, 2), 3.0)}, "b": {"kernel": jnp.full((2, 2), 4.0)},
             "c": {"kernel": jnp.full((2, 2), 100.0)}}
    # eps = 1 keeps the gradient's size in Adam's first step: g / (|g| + 1).
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=1.0, eps=1.0)
    tx = make_optimizer(cfg, 10, group_of=lambda path: path.split("/")[0],
                        scales={"a": 1.0, "b": 2.0, "c": 1.0}, frozen=("c",))
    updates, _ = tx.update(grads, tx.init(params), params)
    # Clipped over a and b only: norm sqrt(4*9 + 4*16) = 10, so the grads become 0.3 and 0.4;
    # the first AdamW step is lr * scale * (g / (|g| + eps) + wd * param).
    lr0 = float(optax.warmup_cosine_decay_schedule(0.0, 0.1, 0, 10, 0.01)(0))
    np.testing.assert_allclose(updates["a"]["kernel"], -lr0 * (0.3 / 1.3 + 0.5), rtol=1e-5)
    np.testing.assert_allclose(updates["b"]["kernel"], -2 * lr0 * (0.4 / 1.4 + 0.5), rtol=1e-5)
    np.testing.assert_array_equal(updates["c"]["kernel"], 0.0)
    # One group and nothing frozen: the plain chain (the layout of older checkpoints).
    plain = make_optimizer(cfg, 10)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.constant_schedule(0.1), mask=decay_mask)).init(
            params))


def test_moshi_param_groups_through_the_registry():
    arch = registry.get("moshi_ttt")
    assert arch.param_group("transformer/layers_1/seq_modeling_block/forward_ssm_gating/"
                            "gating_alpha") == "alpha"
    assert arch.param_group("transformer/layers_1/seq_modeling_block/ttt_layer/W1") == "ttt"
    assert arch.param_group("transformer/layers_0/self_attn/in_proj/kernel") == "backbone"
    cfg = load_config(CONFIGS / "moshi_ttt_tiny.yaml")
    assert arch.lr_scales(cfg)["ttt"] == cfg.model.ttt.weight_lr_multiplier
    assert tuple(arch.frozen_groups(cfg)) == (("backbone",) if cfg.model.ttt.freeze_backbone
                                               else ())


def test_checkpoint_resolve_accepts_every_form(tmp_path):
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR / "7").mkdir(parents=True)
    ckpts = (run / CHECKPOINT_DIR).resolve()
    assert resolve(run) == (ckpts, None)
    assert resolve(run / CHECKPOINT_DIR) == (ckpts, None)
    assert resolve(run / CHECKPOINT_DIR / "7") == (ckpts, 7)
    assert resolve(run / "7") == (ckpts, 7)
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(FileNotFoundError, match="expected RUN_DIR, RUN_DIR/checkpoints"):
            resolve(bad)


def test_no_config_probing_and_no_outside_citations():
    """Code and tests go through the registry and cite only the repository's own docs."""
    sources = [REPO / "train.py", *sorted((REPO / "ttt_jax").rglob("*.py")),
               *sorted((REPO / "tests").glob("*.py"))]
    outside = re.compile(r"DESIGN(\.md)? §|STYLE(\.md)?\b")
    probing = re.compile(r"hasattr\((model_)?cfg|hasattr\(config|getattr\((model_)?cfg, \"")
    me = Path(__file__).resolve()
    for path in sources:
        if path.resolve() == me:
            continue
        text = path.read_text()
        assert not outside.search(text), f"{path} cites a file outside the repository"
        assert not probing.search(text), f"{path} probes a config's attributes"


def test_export_feature_and_hook_go_together():
    """``export`` is supported exactly by the architectures that have an exporter."""
    for name in registry.names():
        arch = registry.get(name)
        assert arch.supports("export") == (arch.export is not None)
    base = registry.get("attention_lm")
    with pytest.raises(ValueError, match="the export feature and the export hook go together"):
        registry.Architecture(**{**base.__dict__, "features": base.features | {"export"}})
