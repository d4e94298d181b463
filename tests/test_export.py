"""PyTorch export/import (ttt_jax.export): key set, round trips, logit parity, errors, CLI.

The expected state-dict keys and shapes are derived here from ttt-lm-pytorch's naming rules,
independently of the export table; logits are checked against ``torch_reference.py`` (a
PyTorch primal-form TTT-LM written from docs/architecture.md) loaded from the exported files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict

from conftest import BATCH, DIM, HEADS, MINI_BATCH
from ttt_jax import TTTLM, ModelConfig, TTTConfig, to_dict
from ttt_jax.export import load_torch, save_torch
from ttt_jax.cli import main as cli

safetensors_numpy = pytest.importorskip("safetensors.numpy")

REPO = Path(__file__).resolve().parents[1]
LENGTH = 2 * MINI_BATCH + 3  # two whole mini-batches and a partial one
VOCAB = 32
PARITY_ATOL = 1e-4  # docs/architecture.md §4: max abs logit difference in float32

# The variant grid: each option of the export appears on and off across the rows.
VARIANTS = {
    "linear-rope": dict(use_rope=True),
    "linear-norope-preconv-untied": dict(pre_conv=True, tie=False, rope_layout="half"),
    "mlp-half-shareqk-gate-untied": dict(mlp=True, use_rope=True, rope_layout="half",
                                         share_qk=True, use_gate=True, tie=False),
    "mlp-half-preconv": dict(mlp=True, use_rope=True, rope_layout="half", pre_conv=True),
    "linear-half-shareqk-gate-preconv": dict(use_rope=True, rope_layout="half", share_qk=True,
                                             use_gate=True, pre_conv=True, conv_kernel=3),
    "mlp-rope-gate-untied": dict(mlp=True, use_rope=True, use_gate=True, tie=False),
}
CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp", "tie_word_embeddings",
    "rope_theta", "use_gate", "share_qk", "ttt_layer_type", "ttt_base_lr", "mini_batch_size",
    "pre_conv", "conv_kernel", "scan_checkpoint_group_size", "architectures", "torch_dtype",
    "model_type",
]


def make_config(mlp=False, tie=True, pre_conv=False, **ttt) -> ModelConfig:
    ttt = TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH,
                    ttt_layer_type="mlp" if mlp else "linear", **ttt)
    return ModelConfig(vocab_size=VOCAB, num_layers=2, intermediate_size=32, ttt=ttt,
                       pre_conv=pre_conv, tie_word_embeddings=tie)


def random_variables(cfg: ModelConfig, seed: int = 0) -> dict:
    """Params far from init (norm scales 1 + noise, everything else N(0, 0.2^2)), no model run."""
    shapes = jax.eval_shape(TTTLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flatten_dict(shapes["params"]).items():
        base = 1.0 if path[-1] in ("weight", "scale", "ttt_norm_weight") else 0.0
        flat[path] = jnp.asarray(base + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)
    return {"params": unflatten_dict(flat)}


def reference_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """ttt-lm-pytorch's state-dict keys and shapes for ``cfg``, from its module names."""
    d, t, v, inter = cfg.model_dim, cfg.ttt, cfg.vocab_size, cfg.intermediate_size
    h, f, b, k = t.num_heads, t.head_dim, t.mini_batch_size, t.conv_kernel
    hidden = 4 * f if t.ttt_layer_type == "mlp" else f
    keys = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        keys["lm_head.weight"] = (v, d)
    for i in range(cfg.num_layers):
        p, s = f"model.layers.{i}.", f"model.layers.{i}.seq_modeling_block."
        keys.update({p + "seq_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                     p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                     p + "mlp.down_proj.weight": (d, inter)})
        if cfg.pre_conv:
            keys.update({p + "conv.norm.weight": (d,), p + "conv.conv.weight": (d, 1, k),
                         p + "conv.conv.bias": (d,)})
        names = ["q_proj", "v_proj", "o_proj"] + ([] if t.share_qk else ["k_proj"])
        keys.update({s + n + ".weight": (d, d) for n in names + (["g_proj"] if t.use_gate else [])})
        if t.share_qk:
            keys.update({s + c + x: shape for c in ("conv_q", "conv_k")
                         for x, shape in ((".weight", (d, 1, k)), (".bias", (d,)))})
        keys.update({s + "learnable_ttt_lr_weight": (h, 1, d), s + "learnable_ttt_lr_bias": (h, 1),
                     s + "learnable_token_idx": (b,), s + "ttt_norm_weight": (h, f),
                     s + "ttt_norm_bias": (h, f), s + "post_norm.weight": (d,),
                     s + "post_norm.bias": (d,), s + "W1": (h, f, hidden),
                     s + "b1": (h, 1, hidden)})
        if t.ttt_layer_type == "mlp":
            keys.update({s + "W2": (h, hidden, f), s + "b2": (h, 1, f)})
    return keys


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg: ModelConfig):
    """One compiled ``TTTLM(cfg).apply`` per config, shared by the tests."""
    return jax.jit(TTTLM(cfg).apply)


def tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, (BATCH, LENGTH))


def assert_bit_exact(a: dict, b: dict) -> None:
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert set(fa) == set(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert y.dtype == np.float32 and x.shape == y.shape and np.array_equal(x, y), k


def export_quietly(cfg, variables, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # use_rope=false rows
        return save_torch(cfg, variables, out, **kw)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    """``(config, variables, export dir)`` for each variant, exported in float32."""
    cfg = make_config(**VARIANTS[request.param])
    variables = random_variables(cfg, seed=len(request.param))
    out = export_quietly(cfg, variables, tmp_path_factory.mktemp("export") / "out")
    return cfg, variables, out


# ----------------------------------------------------------------------------- format


def test_keys_shapes_and_metadata(exported):
    cfg, _, out = exported
    with safetensors_numpy.safe_open(str(out / "model.safetensors"), "np") as fh:
        assert fh.metadata() == {"format": "pt"}
        got = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert got == reference_shapes(cfg)


def test_config_json(exported):
    cfg, _, out = exported
    data = json.loads((out / "config.json").read_text())
    assert set(CONFIG_FIELDS) <= set(data)
    assert data["model_type"] == "ttt" and data["architectures"] == ["TTTForCausalLM"]
    assert data["hidden_act"] == "silu" and data["pretraining_tp"] == 1
    assert data["torch_dtype"] == "float32"
    assert data["use_cache"] is False  # the reference's cache rejects a long first call
    assert data["tie_word_embeddings"] is cfg.tie_word_embeddings
    assert data["ttt_jax"]["model_config"] == to_dict(cfg)


def test_layout_of_unpermuted_params(tmp_path):
    """Dense kernels transposed, conv kernels [K, d] -> [d, 1, K], per-head rows, post_norm."""
    cfg = make_config(use_rope=True, share_qk=True, pre_conv=True, tie=False)
    variables = random_variables(cfg)
    state = safetensors_numpy.load_file(str(save_torch(cfg, variables, tmp_path / "e")
                                            / "model.safetensors"))
    p = variables["params"]
    blk, s = p["layers_1"], "model.layers.1.seq_modeling_block."
    np.testing.assert_array_equal(state[s + "q_proj.weight"],
                                  blk["seq_modeling_block"]["q_proj"]["kernel"].T)
    np.testing.assert_array_equal(state["lm_head.weight"], p["lm_head"]["kernel"].T)
    kernel = np.asarray(blk["seq_modeling_block"]["conv_k"]["kernel"])  # [K, d]
    np.testing.assert_array_equal(state[s + "conv_k.weight"][:, 0, :], kernel.T)
    np.testing.assert_array_equal(state["model.layers.1.conv.conv.weight"][:, 0, -1],
                                  blk["conv"]["conv"]["kernel"][-1])  # last tap: current token
    np.testing.assert_array_equal(state[s + "learnable_ttt_lr_weight"][:, 0],
                                  blk["seq_modeling_block"]["learnable_ttt_lr_weight"])
    np.testing.assert_array_equal(state[s + "post_norm.weight"],
                                  blk["seq_modeling_block"]["post_norm"]["scale"])


# ----------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact(exported):
    cfg, variables, out = exported
    cfg2, variables2 = load_torch(out)
    assert cfg2 == cfg
    assert_bit_exact(variables, variables2)


@pytest.mark.parametrize("name", ["mlp-half-shareqk-gate-untied", "linear-rope"])
def test_bf16_round_trip(tmp_path, name):
    cfg = make_config(**VARIANTS[name])
    variables = random_variables(cfg)
    out = save_torch(cfg, variables, tmp_path / "e", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state = safetensors_numpy.load_file(str(out / "model.safetensors"))
    assert {str(a.dtype) for a in state.values()} == {"bfloat16"}
    cfg2, variables2 = load_torch(out)
    assert cfg2 == cfg
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), variables)
    assert_bit_exact(rounded, variables2)


def test_reads_reference_exports_and_plain_state_dicts(tmp_path):
    """No ttt_jax block (missing fields take the reference defaults), a bare .safetensors with
    an explicit config, a sharded index, and a torch .bin that keeps the tied head."""
    cfg = make_config(use_rope=True, pre_conv=True)  # everything the reference can express
    variables = random_variables(cfg)
    out = save_torch(cfg, variables, tmp_path / "ours")
    ref = json.loads((out / "config.json").read_text())
    del ref["ttt_jax"], ref["tie_word_embeddings"], ref["conv_kernel"]  # defaults: true, 4
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text(json.dumps(ref))
    state = safetensors_numpy.load_file(str(out / "model.safetensors"))
    safetensors_numpy.save_file(state, str(ref_dir / "model.safetensors"), {"format": "pt"})
    for source, config in ((ref_dir, None), (out / "model.safetensors", ref_dir / "config.json"),
                           (out / "model.safetensors", cfg)):
        cfg2, variables2 = load_torch(source, config=config)
        assert cfg2 == cfg  # use_rope on, interleaved: what the reference computes
        assert_bit_exact(variables, variables2)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(ref))
    keys = sorted(state)
    weight_map = {k: f"part{i % 2}.safetensors" for i, k in enumerate(keys)}
    for part in set(weight_map.values()):
        safetensors_numpy.save_file({k: state[k] for k in keys if weight_map[k] == part},
                                    str(sharded / part), {"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_bit_exact(variables, load_torch(sharded)[1])
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    cfg3, variables3 = load_torch(tmp_path / "pytorch_model.bin", config=ref_dir / "config.json")
    assert cfg3 == cfg
    assert_bit_exact(variables, variables3)


# ----------------------------------------------------------------------------- logits


def test_logit_parity_with_torch_reference(exported):
    pytest.importorskip("torch")
    from torch_reference import TorchTTTLM

    cfg, variables, out = exported
    ids = tokens()
    ours = np.asarray(jitted_apply(cfg)(variables, jnp.asarray(ids)))
    model = TorchTTTLM(out)
    theirs = model.logits(ids).numpy()
    assert theirs.shape == (BATCH, LENGTH, VOCAB)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=PARITY_ATOL)
    # the inner loop matters for these params: without it the logits move far
    assert np.abs(model.logits(ids, ttt_base_lr=0.0).numpy() - theirs).max() > 1e-2


def test_half_layout_needs_and_gets_the_change_of_basis(tmp_path):
    """A half-layout model exported runs in the reference's interleaved RoPE with our logits;
    the same params exported without the permutation would not."""
    pytest.importorskip("torch")
    from torch_reference import TorchTTTLM

    cfg = make_config(**VARIANTS["mlp-half-preconv"])  # its compiled apply is reused
    variables = random_variables(cfg, seed=3)
    ids = tokens()
    ours = np.asarray(jitted_apply(cfg)(variables, jnp.asarray(ids)))
    good = TorchTTTLM(save_torch(cfg, variables, tmp_path / "half")).logits(ids).numpy()
    np.testing.assert_allclose(good, ours, rtol=0, atol=PARITY_ATOL)
    naive_cfg = dataclasses.replace(
        cfg, ttt=dataclasses.replace(cfg.ttt, rope_layout="interleaved"))
    naive = TorchTTTLM(save_torch(naive_cfg, variables, tmp_path / "naive")).logits(ids).numpy()
    assert np.abs(naive - ours).max() > 1e-2


# ----------------------------------------------------------------------------- errors


def test_inexpressible_and_lossy_options(tmp_path):
    cfg = make_config(use_rope=True, qk_l2_norm=True)
    with pytest.raises(ValueError, match="qk_l2_norm"):
        save_torch(cfg, random_variables(cfg), tmp_path / "l2")
    assert not (tmp_path / "l2").exists()
    cfg = make_config(use_rope=False)
    with pytest.warns(UserWarning, match="use_rope"):
        out = save_torch(cfg, random_variables(cfg), tmp_path / "norope")
    block = json.loads((out / "config.json").read_text())["ttt_jax"]
    assert block["model_config"]["ttt"]["use_rope"] is False
    assert load_torch(out)[0] == cfg


def test_export_errors(tmp_path):
    cfg = make_config(use_rope=True)
    variables = random_variables(cfg)
    for bad in ("float16", "int8"):
        with pytest.raises(ValueError, match=f"dtype='{bad}'"):
            save_torch(cfg, variables, tmp_path / "x", dtype=bad)
    out = save_torch(cfg, variables, tmp_path / "e")
    with pytest.raises(FileExistsError, match="force"):
        save_torch(cfg, variables, out)
    save_torch(cfg, variables, out, force=True)
    other = make_config(use_rope=True, mlp=True)
    with pytest.raises(ValueError, match="W2"):  # params of another model
        save_torch(other, variables, tmp_path / "wrong")


def test_import_errors(tmp_path):
    cfg = make_config(use_rope=True)
    out = save_torch(cfg, random_variables(cfg), tmp_path / "e")
    state = safetensors_numpy.load_file(str(out / "model.safetensors"))
    key = "model.layers.0.seq_modeling_block.W1"

    def load_with(new_state, config=None):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        safetensors_numpy.save_file(new_state, str(d / "model.safetensors"), {"format": "pt"})
        return load_torch(d, config=config or out / "config.json")

    with pytest.raises(ValueError, match=f"missing keys.*{key}"):
        load_with({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        load_with({**state, "extra.weight": state[key]})
    with pytest.raises(ValueError, match=f"{key} has shape"):
        load_with({**state, key: state[key][:, :, :-1]})
    edited = json.loads((out / "config.json").read_text())
    edited["hidden_size"] = 32
    with pytest.raises(ValueError, match="hidden_size"):
        load_with(state, edited)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_torch(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- CLI


def write_yaml(path: Path, cfg: ModelConfig) -> Path:
    path.write_text(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False))
    return path


def test_cli_export_then_import(tmp_path, capsys):
    cfg = make_config(use_rope=True, rope_layout="half", mlp=True)
    variables = random_variables(cfg)
    params_file = tmp_path / "params.msgpack"
    params_file.write_bytes(flax.serialization.msgpack_serialize(variables))
    config_file = write_yaml(tmp_path / "model.yaml", cfg)
    out = tmp_path / "export"
    assert cli(["export", "--params", str(params_file), "--config", str(config_file),
                "--out", str(out)]) == 0
    assert cli(["import", "--in", str(out), "--out", str(tmp_path / "back.msgpack")]) == 0
    back = flax.serialization.msgpack_restore((tmp_path / "back.msgpack").read_bytes())
    assert_bit_exact(variables, back)
    from ttt_jax import load_config
    assert load_config(tmp_path / "back.yaml").model == cfg
    # --config: the weights' config.json, or a run config giving the model (reference basis)
    for i, config in enumerate((out / "config.json", config_file)):
        target = tmp_path / f"again_{i}.msgpack"
        assert cli(["import", "--in", str(out / "model.safetensors"), "--config", str(config),
                    "--out", str(target)]) == 0
        assert_bit_exact(variables, flax.serialization.msgpack_restore(target.read_bytes()))
    # bf16, from a bare params tree
    params_file.write_bytes(flax.serialization.msgpack_serialize(variables["params"]))
    assert cli(["export", "--params", str(params_file), "--config", str(config_file),
                "--out", str(out), "--dtype", "bf16", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_errors_exit_2(tmp_path, capsys):
    cfg = make_config(use_rope=True)
    params_file = tmp_path / "params.msgpack"
    params_file.write_bytes(flax.serialization.msgpack_serialize(random_variables(cfg)))
    good = write_yaml(tmp_path / "good.yaml", cfg)
    l2 = write_yaml(tmp_path / "l2.yaml", make_config(use_rope=True, qk_l2_norm=True))
    swa = write_yaml(tmp_path / "swa.yaml", dataclasses.replace(cfg, seq_modeling="swa"))
    existing = tmp_path / "existing"
    existing.mkdir()
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["export", "--params", str(tmp_path / "missing.msgpack"), "--config", str(good),
          "--out", out], "missing.msgpack"),
        (["export", "--params", str(good), "--config", str(good), "--out", out],
         "not a Flax msgpack"),
        (["export", "--checkpoint", str(tmp_path / "no_ckpt"), "--config", str(good),
          "--out", out], "no_ckpt' does not exist"),
        (["export", "--checkpoint", str(not_ckpt), "--config", str(good), "--out", out],
         "not_a_checkpoint' is not a recognised checkpoint"),
        (["export", "--params", str(params_file), "--config", str(tmp_path / "nocfg.yaml"),
          "--out", out], "nocfg.yaml"),
        (["export", "--params", str(params_file), "--config", str(l2), "--out", out],
         "qk_l2_norm"),
        (["export", "--params", str(params_file), "--config", str(good), "--out", out,
          "--dtype", "fp16"], "dtype='fp16'"),
        (["export", "--params", str(params_file), "--config", str(good), "--out", str(existing)],
         "--force"),
        (["import", "--in", str(tmp_path / "no_export"), "--out", str(tmp_path / "x.msgpack")],
         "no_export"),
        (["import", "--in", str(not_ckpt), "--out", str(params_file)], "--force"),
        (["import", "--in", str(not_ckpt), "--out", out, "--prefix", "transformer."],
         "--prefix does not apply to a ttt_lm import"),
        (["import", "--in", str(not_ckpt), "--out", out, "--config", str(swa)],
         "no importer for architecture 'attention_lm'"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not Path(out).exists()


def test_cli_module_entry_point(tmp_path):
    """``python -m ttt_jax.export`` is ``ttt-jax export`` (the default) or ``ttt-jax import``."""
    config_file = write_yaml(tmp_path / "model.yaml", make_config(use_rope=True))
    result = subprocess.run(
        [sys.executable, "-m", "ttt_jax.export", "--checkpoint",
         str(tmp_path / "absent"), "--config", str(config_file), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: checkpoint "), \
        result.stderr
    assert "absent' does not exist" in result.stderr, result.stderr


def test_cli_exports_a_training_checkpoint(tmp_path, capsys):
    """``--checkpoint RUN_DIR`` reads the params and the model config stored by training."""
    import optax

    from ttt_jax import RunConfig
    from ttt_jax.checkpoint import Checkpointer
    from ttt_jax.config import TrainConfig
    from ttt_jax.training import TrainState

    cfg = make_config(mlp=True, use_rope=True, rope_layout="half")
    params = random_variables(cfg)["params"]
    run = RunConfig(model=cfg, train=TrainConfig(run_dir=str(tmp_path / "run")))
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=params,
                       opt_state=optax.sgd(0.1).init(params))
    ckpt = Checkpointer(tmp_path / "run", every=1, keep=1)
    assert ckpt.save(state, run)
    ckpt.close()
    sources = (tmp_path / "run", tmp_path / "run" / "checkpoints" / "7", tmp_path / "run" / "7")
    for i, source in enumerate(sources):
        out = tmp_path / f"export_{i}"
        assert cli(["export", "--checkpoint", str(source), "--out", str(out)]) == 0
        got_cfg, got = load_torch(out)
        assert got_cfg == cfg
        for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "8"),
                "--out", str(tmp_path / "x")]) == 2
    assert "checkpoints/8' does not exist" in capsys.readouterr().err
