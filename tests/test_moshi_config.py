"""Moshi-TTT presets (parsed, round-tripped, sized by eval_shape), frame data, train.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ttt_jax.config import RunConfig, load_config, save_config
from ttt_jax.moshi.config import (MoshiDataConfig, MoshiRunConfig, TTTArgs,
                                  load_ttt_block)
from ttt_jax.moshi.data import make_frames_dataset
from ttt_jax import registry

REPO = Path(__file__).resolve().parents[1]
# The presets of the hybrid (architecture: moshi_ttt); those of the whole LMModel (moshi_lm, the
# 7B Moshi-TTT recipe among them) are in tests/test_moshi_lm.py.
PRESETS = sorted(p for p in (REPO / "configs").glob("moshi_*.yaml")
                 if "architecture: moshi_ttt" in p.read_text())


def expected_param_count(model: dict) -> int:
    """From the YAML's numbers alone: moshi's layer shapes plus the grafted TTT-MLP layers."""
    t, ttt = model["transformer"], model["ttt"]
    d, n, h = t["d_model"], t["num_layers"], t["num_heads"]
    dff = t["dim_feedforward"]
    hidden = 21 * d // 8 if dff == 4 * d else 2 * dff // 3  # moshi's gating rule
    layer = 4 * d * d + 2 * d + 3 * d * hidden  # in_proj (3d^2) + out_proj, norms, gating
    layer += 2 * d if t.get("layer_scale") is not None else 0
    heads = ttt.get("num_heads") or h
    f, b = d // heads, ttt.get("mini_batch_size", 16)
    graft = 4 * d * d + 2 * d  # q, k, v, o projections; post_norm
    graft += heads * d + heads + b + 2 * heads * f  # lr gate, token idx, ttt_norm
    graft += heads * (f * 4 * f + 4 * f) + heads * (4 * f * f + f)  # W1 b1 W2 b2
    graft += d  # gating_alpha
    if not ttt.get("enable"):
        grafted = 0
    elif ttt["layers"] == "middle":
        grafted = 3 * n // 4 - n // 4
    elif ttt["layers"] == "all":
        grafted = n
    else:
        grafted = len(str(ttt["layers"]).split(","))
    streams = sum(model["vocab_sizes"]) * d * 2  # embedding + head per stream
    return streams + n * layer + grafted * graft + d  # + out_norm


def test_presets_exist():
    assert {p.name for p in PRESETS} == {"moshi_ttt_tiny.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_round_trips_and_counts(path, tmp_path):
    cfg = load_config(path, MoshiRunConfig)
    assert load_config(path) == cfg  # the registry reads `architecture: moshi_ttt`
    out = tmp_path / path.name
    save_config(cfg, out)
    assert load_config(out, MoshiRunConfig) == cfg
    with pytest.raises(ValueError, match="unknown key.*transformer"):
        load_config(path, RunConfig)  # a TTT-LM run config refuses the Moshi model section
    count = registry.get("moshi_ttt").count_params(cfg.model)  # jax.eval_shape: nothing allocated
    print(f"{path.name}: {count:,} parameters")
    assert count == expected_param_count(yaml.safe_load(path.read_text())["model"])


def test_7b_preset_is_the_whole_moshi_7b_with_ttt_in_the_middle():
    """The Moshi-TTT 7B recipe is the published LMModel (moshi_lm_7b.yaml, checked against
    moshi's own keyword arguments in tests/test_moshi_lm.py) with TTT-MLP in layers 8-23."""
    from ttt_jax.moshi.lm_config import MoshiLMRunConfig

    run = load_config(REPO / "configs" / "moshi_ttt_7b.yaml")
    plain = load_config(REPO / "configs" / "moshi_lm_7b.yaml")
    assert isinstance(run, MoshiLMRunConfig) and isinstance(plain, MoshiLMRunConfig)
    cfg = run.model
    t = cfg.transformer
    assert (t.d_model, t.num_layers, t.num_heads, t.context) == (4096, 32, 32, 3000)
    assert t.hidden_size == 11264 and t.layer_scale is None and t.norm == "rms_norm_f32"
    assert cfg.temporal.ttt_layers == tuple(range(8, 24)) and plain.model.temporal.ttt_layers == ()
    assert cfg.ttt.noop_init and cfg.ttt.freeze_backbone
    assert dataclasses.replace(cfg, ttt=plain.model.ttt) == plain.model
    count = registry.get("moshi_lm").count_params(cfg)
    assert 8.5e9 < count < 9e9, count  # 7.7B LMModel + 1.1B TTT


def test_moshi_ttt_block_file_loads_unchanged(tmp_path):
    args = load_ttt_block(REPO / "configs" / "ttt_with_rope_example.yaml")
    assert args == TTTArgs(enable=True, layers="middle", ttt_base_lr=1.0, mini_batch_size=16,
                           use_rope=True, rope_theta=10000.0)
    assert args.layer_indices(32) == tuple(range(8, 24))
    # The block inside a larger fine-tuning YAML, without the RoPE keys: off, theta 10000.
    path = tmp_path / "finetune.yaml"
    path.write_text("lora: {enable: false}\nttt:\n  enable: true\n  layers: \"1,5,9\"\n")
    plain = load_ttt_block(path)
    assert (plain.use_rope, plain.rope_theta, plain.layer_indices(10)) == (False, 10000.0,
                                                                          (1, 5, 9))
    path.write_text("ttt:\n  enable: true\n  mini_batch_size: 0\n")
    with pytest.raises(ValueError, match=r"finetune.yaml: ttt.mini_batch_size=0 is invalid"):
        load_ttt_block(path)


# Every key of the public Moshi-TTT `ttt:` block (its TTTArgs dataclass) with its default there.
PUBLIC_BLOCK = {
    "enable": False, "layers": "middle", "base_lr": 1.0, "mini_batch_size": 16,
    "persistent_states": True, "initial_gating_alpha": 0.1,
    "override_gating_alpha_on_resume": False, "ttt_layer_context": None,
    "non_ttt_layer_context": None, "weight_lr_multiplier": 10.0, "alpha_lr_multiplier": 100.0,
    "log_inner_loop_losses": False, "inner_loop_log_interval": 1,
    "save_inner_loop_plots": False, "inner_loop_plot_dir": "./evaluation_plots/inner_loop",
    "optimize_chunk_size": True, "chunk_size": None, "max_chunk_size": 50,
    "prefer_efficiency": True, "ttt_mlp_layers": 2, "ttt_mlp_hidden_dims": None,
    "ttt_mlp_expansion_factor": 4.0, "normalize_ttt_output": False, "target_output_norm": 25.0,
    "use_rope": False, "rope_theta": 10000.0, "unfrozen_attention_layers": "none",
    "enable_training_diagnostics": False, "training_diagnostic_frequency": 100,
}


def test_every_public_block_key_is_read_or_refused_with_a_reason():
    from ttt_jax.moshi.config import load_ttt_args

    block = dict(PUBLIC_BLOCK)
    args = load_ttt_args(block)
    assert (args.layers, args.ttt_base_lr, args.weight_lr_multiplier,
            args.alpha_lr_multiplier, args.persistent_states) == ("middle", 1.0, 10.0, 100.0,
                                                                   True)
    table = (REPO / "docs" / "moshi.md").read_text()
    fields = {f.name for f in dataclasses.fields(TTTArgs)} | set(TTTArgs.YAML_ALIASES)
    for key in PUBLIC_BLOCK:
        assert key in fields or key in TTTArgs.YAML_FOREIGN, key
        assert f"| `{key}` |" in table, f"docs/moshi.md has no row for {key}"
    for key, value in (("ttt_mlp_layers", 3),
                       ("normalize_ttt_output", True), ("ttt_layer_context", 750),
                       ("unfrozen_attention_layers", "middle")):
        with pytest.raises(ValueError, match=rf"ttt\.{key}={value!r} is not supported: \w+"):
            load_ttt_args({**block, key: value})


def test_the_public_block_example_trains_through_train_py(tmp_path, train_main):
    run_dir = tmp_path / "run"
    assert train_main(["--config", str(REPO / "configs" / "ttt_with_rope_example.yaml"),
                       "--set", "train.steps=2", "--set", "data.seq_len=16",
                       "--set", "model.transformer.num_layers=2", "--set", "train.log_every=1",
                       "--set", "train.eval_batches=1", "--set", f"train.run_dir={run_dir}"]) == 0
    cfg = load_config(run_dir / "config.yaml")
    assert isinstance(cfg, MoshiRunConfig)
    assert (cfg.model.ttt.enable, cfg.model.ttt.use_rope, cfg.model.ttt.mini_batch_size) == \
        (True, True, 16)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    other = tmp_path / "other.yaml"
    other.write_text("ttt: {enable: true}\nlora: {enable: true}\n")
    assert train_main(["--config", str(other), "--check"]) == 2


def write_codebooks(tmp_path, arrays):
    d = tmp_path / "codes"
    d.mkdir()
    for i, a in enumerate(arrays):
        np.save(d / f"{i}.npy", a)
    return str(d)


def test_codebook_frames(tmp_path):
    rng = np.random.default_rng(0)
    files = [np.stack([rng.integers(0, 10, 90), rng.integers(0, 5, 90)]).astype(np.uint16)
             for _ in range(2)]
    cfg = MoshiDataConfig(source="codebooks", path=write_codebooks(tmp_path, files),
                          seq_len=9, batch_size=3, val_fraction=0.2)
    train = make_frames_dataset(cfg, (10, 5), seed=0, split="train")
    val = make_frames_dataset(cfg, (10, 5), seed=0, split="val")
    batch = train.batch(0)
    assert batch.shape == (3, 10, 2) and batch.dtype == np.int32
    for row in batch:  # every row is a window of one file, frames along axis 0
        hits = [s for f in files for s in range(0, 81)
                if np.array_equal(f[:, s:s + 10].T, row)]
        assert hits and all(s + 10 <= 72 for s in hits)  # train stays before the val tail
    assert np.array_equal(train.batch(5), train.batch(5))
    assert val.batch(0).shape == (3, 10, 2)


@pytest.mark.parametrize("arrays, vocabs, match", [
    ([np.zeros((3, 50), np.int32)], (10, 5), r"has shape \[3, 50\]: expected \[K, T\] with K=2"),
    ([np.full((2, 50), 7, np.int32)], (10, 5), r"stream 1 has token id 7: expected ids in \[0, 5\)"),
    ([np.zeros((2, 50), np.float32)], (10, 5), r"dtype float32: expected integer token ids"),
    ([np.zeros((2, 12), np.int32)], (10, 5), r"no window of seq_len\+1=10 frames"),
])
def test_codebook_errors(tmp_path, arrays, vocabs, match):
    cfg = MoshiDataConfig(source="codebooks", path=write_codebooks(tmp_path, arrays), seq_len=9,
                          batch_size=2)
    with pytest.raises(ValueError, match=match):
        make_frames_dataset(cfg, vocabs, seed=0, split="train")


def test_codebook_path_required_and_checked(tmp_path):
    with pytest.raises(ValueError, match=r"data.path=None is invalid"):
        MoshiDataConfig(source="codebooks")
    cfg = MoshiDataConfig(source="codebooks", path=str(tmp_path / "nope.npy"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_frames_dataset(cfg, (4,), seed=0, split="train")


def test_bad_layer_index_in_yaml_names_the_field(tmp_path, train_main, capsys):
    data = yaml.safe_load((REPO / "configs" / "moshi_ttt_tiny.yaml").read_text())
    data["model"]["ttt"]["layers"] = "1,9"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert train_main(["--config", str(path), "--check"]) == 2
    assert "ttt.layers='1,9' is invalid: expected layer indices in [0, 3]" in capsys.readouterr().err


def test_tiny_preset_trains_through_train_py(tmp_path, train_main):
    """A Moshi-TTT run trains, checkpoints and logs the inner-loss diagnostics of its grafted
    layers (the same extraction as the TTT-LM's, which tests/test_eval_context.py checks against
    numpy)."""
    run_dir = tmp_path / "run"
    code = train_main(["--config", str(REPO / "configs" / "moshi_ttt_tiny.yaml"),
                       "--set", "train.steps=2", "--set", "data.seq_len=16",
                       "--set", "train.diagnostics_every=1",
                       "--set", "model.transformer.num_layers=2",  # TTT in layer 0 only
                       "--set", "model.ttt.layer_type=linear",  # the cheapest to compile
                       "--set", "train.eval_batches=1", "--set", "train.log_every=1",
                       "--set", f"train.run_dir={run_dir}"])
    assert code == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    diagnostics = [r for r in records if r["kind"] == "ttt_diagnostics"]
    assert [r["step"] for r in diagnostics] == [1, 2]
    for r in diagnostics:  # one grafted layer: layer 0 of 2 (`middle`)
        assert len(r["layers"]) == 1 and set(r["layers"][0]) == {"w0", "before", "after"}
        assert all(np.isfinite(v) and v > 0 for v in r["layers"][0].values())
    assert (run_dir / "checkpoints").is_dir()
    assert isinstance(load_config(run_dir / "config.yaml"), MoshiRunConfig)


def test_single_byte_stream():
    """One stream: the byte corpus as [B, L+1, 1] frames; the model also takes [B, T] ids."""
    import jax
    import jax.numpy as jnp

    from ttt_jax.moshi.config import MoshiTTTConfig, MoshiTransformerConfig
    from ttt_jax.moshi.hybrid import MoshiTTTLM

    ds = make_frames_dataset(MoshiDataConfig(source="bytes", seq_len=12, batch_size=2), (256,),
                             seed=0, split="val")
    batch = ds.batch(0)
    assert batch.shape == (2, 13, 1) and batch.max() < 256
    cfg = MoshiTTTConfig(transformer=MoshiTransformerConfig(d_model=16, num_heads=2, num_layers=2,
                                                            dim_feedforward=32, context=4),
                         ttt=TTTArgs(enable=True, layers="all", mini_batch_size=4),
                         vocab_sizes=(256,))
    model = MoshiTTTLM(cfg)
    ids = jnp.zeros((2, 12), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    assert jax.eval_shape(model.apply, variables, ids).shape == (2, 12, 256)
    assert jax.eval_shape(model.apply, variables, ids[..., None]).shape == (2, 12, 1, 256)
    with pytest.raises(ValueError, match=r"expects integer token ids of shape \[B, T, K\] or "
                                         r"\[B, T\] with K=1 streams, got int32\[2, 12, 3\]"):
        jax.eval_shape(model.apply, variables, jnp.zeros((2, 12, 3), jnp.int32))
