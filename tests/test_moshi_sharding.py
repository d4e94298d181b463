"""Sharded Moshi runs: the param rules, remat, a scaled-down MoshiLM on 8 fake devices, restore
onto another mesh, and the 7B recipes' memory estimate (docs/moshi.md, "Sharded runs").

The 8-device run happens in one subprocess (``tests/sharding_worker.py moshi``), started when
this module's first test asks for it so that it runs while the in-process tests do. Meshes are
(fsdp, tensor) with data 1: (8, 1), (2, 4) and (1, 8); the reference is the plain
single-device step (no remat) from the same initial state.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_XLA  # cheaper compiles: the tiny programs run in microseconds
from ttt_jax import registry
from ttt_jax.moshi.sharding import MOSHI_RULES, unmatched
from ttt_jax.sharding import Split, spec_for
from ttt_jax.tree import flatten

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOL = 1e-5
MESHES = ("fsdp8", "fsdp2_tensor4", "tensor8")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("moshi_sharding")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_XLA}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(WORKER), "moshi", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {}

    def result():
        if "json" not in state:
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, log[-4000:]
            state["json"] = json.loads((out / "moshi.json").read_text())
        return state["json"]

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_start_worker(worker):
    """Starts the 8-device run first; the other tests run meanwhile."""


# ---- rules, in this process ---------------------------------------------------------------


def _shapes(config: str, *overrides: str):
    cfg = registry.load_run(CONFIGS / config, list(overrides))
    return registry.of(cfg).param_shapes(cfg.model)


@pytest.mark.parametrize("config, overrides", [
    ("moshi_lm_tiny.yaml", ["model.lora.enable=true", "model.lora.rank=4"]),
    ("moshi_lm_tiny.yaml", ["model.ttt.layer_type=mlp", "model.depformer.weights_per_step=false",
                            "model.bias_proj=true", "model.transformer.layer_scale=0.1",
                            "model.depformer.layer_scale=0.1"]),
    ("moshi_ttt_tiny.yaml", ["model.lora.enable=true", "model.lora.rank=4",
                             "model.ttt.pre_norm=true"]),
])
def test_every_moshi_param_has_a_rule(config, overrides):
    params = _shapes(config, *overrides)
    assert unmatched(params) == []
    lora = [k for k in flatten(params) if k.endswith(("lora_a", "lora_b"))]
    assert bool(lora) == ("model.lora.enable=true" in overrides)


def test_split_puts_tensor_on_heads_and_fsdp_on_the_largest_dim():
    fsdp8 = {"data": 1, "fsdp": 8, "tensor": 1}
    f2t4 = {"data": 1, "fsdp": 2, "tensor": 4}
    t8 = {"data": 1, "fsdp": 1, "tensor": 8}

    def spec(path, shape, sizes):
        return tuple(spec_for(path, shape, sizes, MOSHI_RULES))

    attn = "transformer/layers_3/self_attn/in_proj/kernel"
    assert spec(attn, (4096, 12288), fsdp8) == (None, "fsdp")  # the largest dim
    assert spec(attn, (4096, 12288), f2t4) == ("fsdp", "tensor")  # 4096 > 12288 / 4
    assert spec(attn, (4096, 12288), t8) == (None, "tensor")
    out = "transformer/layers_3/self_attn/out_proj/kernel"
    assert spec(out, (4096, 4096), f2t4) == ("tensor", "fsdp")
    ffn_out = "transformer/layers_0/gating/linear_out/kernel"
    assert spec(ffn_out, (11264, 4096), fsdp8) == ("fsdp",)
    # Embeddings [V + 1, d]: V + 1 is odd, so both axes split the width.
    assert spec("text_emb/embedding", (32001, 4096), f2t4) == (None, ("tensor", "fsdp"))
    assert spec("emb_3/embedding", (2049, 4096), fsdp8) == (None, "fsdp")
    assert spec("text_linear/kernel", (4096, 32000), f2t4) == (None, ("tensor", "fsdp"))
    assert spec("depformer_in_2/kernel", (4096, 1024), fsdp8) == ("fsdp",)
    ttt = "transformer/layers_8/seq_modeling_block/ttt_layer/"
    assert spec(ttt + "W1", (32, 128, 512), f2t4) == ("tensor", None, "fsdp")
    assert spec(ttt + "learnable_ttt_lr_bias", (32,), f2t4) == ("tensor",)
    assert spec(ttt + "q_proj/kernel", (4096, 4096), t8) == (None, "tensor")
    lora = "transformer/layers_0/self_attn/in_proj/"
    assert spec(lora + "lora_a", (4096, 64), fsdp8) == ("fsdp",)
    assert spec(lora + "lora_b", (64, 12288), f2t4) == (None, ("tensor", "fsdp"))
    for small in ("transformer/layers_0/norm1/alpha", "out_norm/alpha",
                  ttt + "post_norm/scale", ttt + "learnable_token_idx",
                  "transformer/layers_8/seq_modeling_block/forward_ssm_gating/gating_alpha"):
        assert spec(small, (4096,), f2t4) == ()
    # A dim neither axis divides stays whole.
    assert Split(tensor=1).spec((6, 10), {"fsdp": 4, "tensor": 4}) == jax.sharding.PartitionSpec()


def test_bf16_compute_keeps_float32_params_optimizer_and_ttt_state():
    cfg = registry.load_run(CONFIGS / "moshi_lm_tiny.yaml", ["model.dtype=bfloat16"])
    arch = registry.of(cfg)
    optimizer = arch.make_optimizer(cfg)
    state = jax.eval_shape(lambda k: arch.init_state(cfg, optimizer, k), jax.random.PRNGKey(0))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    from ttt_jax.moshi.hybrid import MoshiTTTLM

    temporal = cfg.model.temporal
    model = MoshiTTTLM(temporal)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 1), jnp.int32))
    cache = jax.eval_shape(lambda p: model.apply(p, 2, method="init_cache"), params)
    ttt = flatten(cache["layers"][0]["ttt"])
    assert {v.dtype for k, v in ttt.items() if jnp.issubdtype(v.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}


def test_remat_is_a_config_choice():
    with pytest.raises(ValueError, match=r"model.remat='all' is invalid"):
        registry.load_run(CONFIGS / "moshi_lm_tiny.yaml", ["model.remat=all"])
    plain = _shapes("moshi_lm_tiny.yaml")
    remat = _shapes("moshi_lm_tiny.yaml", "model.remat=layer")
    assert jax.tree.map(lambda x: (x.shape, x.dtype), plain) == jax.tree.map(
        lambda x: (x.shape, x.dtype), remat)


# ---- the 7B recipes' --check --------------------------------------------------------------

ESTIMATE = re.compile(r"memory per device \(estimate, (?P<where>[^)]*\)?)\): params (?P<params>"
                      r"[\d.]+) GiB .* = (?P<total>[\d.]+) GiB")


def _check(train_main, capsys, monkeypatch, tmp_path, config, *overrides):
    from ttt_jax import trainer

    # One 7B checkpoint needs ~90 GiB of disk, which a test machine may lack.
    monkeypatch.setattr(trainer, "check_free_space", lambda *a, **k: None)
    argv = ["--config", config, "--set", "data.source=synthetic",
            "--set", f"train.run_dir={tmp_path / 'run'}", "--check"]
    for o in overrides:
        argv += ["--set", o]
    code = train_main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    match = ESTIMATE.search(out)
    assert match, out
    return match, out


def test_7b_recipes_hold_the_mesh_and_remat():
    """So ``--check`` with and without ``--set mesh.fsdp=8`` checks the same run."""
    from ttt_jax.config import MeshConfig

    for name in ("moshi_ttt_7b.yaml", "moshi_lm_7b.yaml"):
        plain = registry.load_run(CONFIGS / name)
        assert plain.mesh == MeshConfig(data=-1, fsdp=8, tensor=1)
        assert plain.model.remat == "layer" and plain.model.dtype == "bfloat16"
        assert registry.load_run(CONFIGS / name, ["mesh.fsdp=8"]) == plain


def test_moshi_ttt_7b_check_prints_the_estimate_for_8_devices(
        train_main, capsys, monkeypatch, tmp_path):
    match, out = _check(train_main, capsys, monkeypatch, tmp_path, "moshi_ttt_7b", "mesh.fsdp=8")
    assert match["where"] == "mesh data=1 fsdp=8 tensor=1 (8 devices)"
    assert re.search(r"\(2 rows x 3000 positions, [\d.]+ GiB of it one recomputed layer\)", out)
    assert 3 < float(match["params"]) < 5  # ~7.7e9 float32 params / 8
    assert float(match["total"]) < 80  # fits an 80 GB device


def test_moshi_lm_7b_check_and_one_device(train_main, capsys, monkeypatch, tmp_path):
    match, _ = _check(train_main, capsys, monkeypatch, tmp_path, "moshi_lm_7b")
    assert match["where"] == "mesh data=1 fsdp=8 tensor=1 (8 devices)"
    assert float(match["total"]) < 80
    match, _ = _check(train_main, capsys, monkeypatch, tmp_path, "moshi_lm_tiny", "mesh=null")
    assert match["where"] == "one device"


# ---- 8 fake devices -----------------------------------------------------------------------


def test_meshes_match_the_single_device_run(worker):
    runs = worker()["runs"]
    assert worker()["devices"] == 8
    single = np.asarray(runs["single"]["losses"])
    assert len(single) == 3 and np.all(np.isfinite(single))
    for name in MESHES:
        run = runs[name]
        assert np.prod(list(run["mesh_shape"].values())) == 8
        np.testing.assert_allclose(run["losses"], single, rtol=TOL, err_msg=name)
        assert run["max_param_diff_vs_single"] < TOL, name


def test_mesh_params_follow_the_rules(worker):
    runs = worker()["runs"]
    f2t4 = runs["fsdp2_tensor4"]
    assert f2t4["mesh_shape"] == {"data": 1, "fsdp": 2, "tensor": 4}
    specs = f2t4["param_specs"]
    expected = {
        "transformer/layers_0/self_attn/in_proj/kernel": "('fsdp', 'tensor')",  # [32, 96]
        "transformer/layers_0/self_attn/out_proj/kernel": "('tensor', 'fsdp')",  # [32, 32]
        "transformer/layers_0/gating/linear_in/kernel": "('fsdp', 'tensor')",  # [32, 84]
        "transformer/layers_1/seq_modeling_block/ttt_layer/W1": "('tensor', 'fsdp')",  # [4, 8, 8]
        "transformer/layers_1/seq_modeling_block/ttt_layer/q_proj/kernel": "('fsdp', 'tensor')",
        "text_emb/embedding": "(None, ('tensor', 'fsdp'))",  # [17, 32]
        "text_linear/kernel": "('fsdp', 'tensor')",  # [32, 16]
        "linears_0/kernel": "('fsdp', 'tensor')",  # [16, 8]
        "out_norm/alpha": "()",
    }
    assert {k: specs[k] for k in expected} == expected
    assert runs["fsdp2_tensor4"]["specs_after_training"] == specs
    fsdp8 = runs["fsdp8"]["param_specs"]
    assert fsdp8["transformer/layers_0/self_attn/in_proj/kernel"] == "(None, 'fsdp')"
    assert runs["tensor8"]["param_specs"]["text_linear/kernel"] == "(None, 'tensor')"
    # Adam's moments follow their param.
    opt = f2t4["opt_specs"]
    mu = {k.split("/mu/", 1)[1]: v for k, v in opt.items() if "/mu/" in k}
    assert mu and all(specs[k] == v for k, v in mu.items())


def test_checkpoint_restores_onto_another_mesh(worker):
    result = worker()
    straight = result["runs"]["single"]["losses"][2:]
    for name in ("tensor8", "single"):
        entry = result["restores"][name]
        assert entry["step"] == 2 and entry["max_abs_diff"] == 0.0
        np.testing.assert_allclose(entry["losses"], straight, rtol=TOL, err_msg=name)
        assert entry["max_param_diff_vs_single"] < TOL, name
    assert result["restores"]["tensor8"]["param_specs"] == result["runs"]["tensor8"]["param_specs"]


def test_persistent_states_on_a_mesh_match_one_device(worker):
    """The carried state's rows are split as the batch's; three steps equal one device's."""
    run = worker()["persistent"]
    assert run["carry_rows"] == 8 and run["carry_specs"]
    assert all("fsdp" in spec for spec in run["carry_specs"])
    np.testing.assert_allclose(run["fsdp8"], run["single"], rtol=TOL)
    assert run["max_carry_diff"] < TOL
