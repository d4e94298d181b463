"""Sharded training: mesh config, sharding rules, losses across meshes, restore on another mesh,
and a two-process run joined by ``jax.distributed``.

Fake devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts, so
the multi-device runs happen in subprocesses (``tests/sharding_worker.py``), all started at once
by one fixture: one process with 8 devices (the meshes), and two processes with 4 devices each
joined through a localhost coordinator. The reference everywhere is the plain single-device
step, run in the same 8-device process from the same initial state.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FAST_XLA  # cheaper compiles: the tiny programs run in microseconds
from ttt_jax import from_dict, to_dict
from ttt_jax.config import MeshConfig, RunConfig
from ttt_jax.distributed import distributed_settings, read_rows
from ttt_jax.sharding import make_mesh, spec_for

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
STEPS, SAVE_AT = 5, 3
RTOL = 1e-5


# ---- config and rules, in this process ----------------------------------------------------


def _run_dict(**mesh):
    data = {"model": {"vocab_size": 32, "num_layers": 1, "intermediate_size": 32,
                      "ttt": {"model_dim": 16, "num_heads": 2}},
            "data": {"batch_size": 16}}
    if mesh:
        data["mesh"] = mesh
    return data


def test_mesh_is_off_by_default_and_round_trips():
    cfg = from_dict(RunConfig, _run_dict())
    assert cfg.mesh is None
    cfg = from_dict(RunConfig, _run_dict(data=2, fsdp=4))
    assert cfg.mesh == MeshConfig(data=2, fsdp=4, tensor=1)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert MeshConfig().resolve(8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert MeshConfig(data=2, fsdp=-1).resolve(8) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("mesh, message", [
    (dict(data=0), "mesh.data=0 is invalid: expected a positive integer, or -1"),
    (dict(fsdp=-2), "mesh.fsdp=-2 is invalid"),
    (dict(tensor=True), "mesh.tensor=True is invalid"),
    (dict(data=-1, fsdp=-1), "mesh.fsdp=-1 is invalid: expected a positive integer (only one axis"),
    (dict(data=3), "data.batch_size=16 is invalid: expected a multiple of mesh.data*mesh.fsdp=3"),
    (dict(data=2, fsdp=16), "data.batch_size=16 is invalid: expected a multiple of "
                            "mesh.data*mesh.fsdp=32"),
])
def test_bad_mesh_config_names_the_field(mesh, message):
    with pytest.raises(ValueError) as e:
        from_dict(RunConfig, _run_dict(**mesh))
    assert message in str(e.value)


def test_bad_mesh_keys_and_device_counts():
    with pytest.raises(ValueError, match="unknown key.*model.*in mesh"):
        from_dict(RunConfig, _run_dict(model=2))
    with pytest.raises(ValueError, match=r"mesh.data=3\*mesh.fsdp=2\*mesh.tensor=1 is invalid: "
                                         r"expected a product \(6\) that divides the device count 8"):
        MeshConfig(data=3, fsdp=2).resolve(8)
    with pytest.raises(ValueError, match="divides the device count 1"):
        make_mesh(MeshConfig(data=2), jax.devices()[:1])
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_mesh_from_command_line_overrides():
    from ttt_jax import apply_overrides

    cfg = from_dict(RunConfig, _run_dict())
    assert apply_overrides(cfg, ["mesh.fsdp=4"]).mesh == MeshConfig(data=-1, fsdp=4)
    assert apply_overrides(cfg, ["mesh.fsdp=4", "mesh.data=2"]).mesh == MeshConfig(2, 4, 1)
    assert apply_overrides(cfg, ["mesh={data: 8}"]).mesh == MeshConfig(data=8)
    with pytest.raises(ValueError, match="unknown key 'mesh.pipeline'"):
        apply_overrides(cfg, ["mesh.pipeline=2"])


def test_micro_batch_must_split_over_data_and_fsdp():
    data = _run_dict(data=4)
    data["train"] = {"grad_accum": 8}  # 16 / 8 = 2 rows per micro-batch, not a multiple of 4
    with pytest.raises(ValueError, match="per micro-batch"):
        from_dict(RunConfig, data)


def test_spec_rules_skip_axes_that_do_not_divide():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert tuple(spec_for("embed_tokens/embedding", (32, 16), sizes)) == ("tensor", "fsdp")
    assert tuple(spec_for("embed_tokens/embedding", (33, 16), sizes)) == (None, "fsdp")
    assert tuple(spec_for("embed_tokens/embedding", (32, 6), sizes)) == ("tensor",)
    assert tuple(spec_for("layers_3/seq_modeling_block/W1", (4, 8, 8), sizes)) == ("tensor",)
    assert tuple(spec_for("layers_3/seq_modeling_block/W1", (3, 8, 8), sizes)) == ()
    assert tuple(spec_for("layers_0/seq_modeling_block/conv_q/kernel", (4, 16), sizes)) == ()
    assert tuple(spec_for("some/new/param", (64, 64), sizes)) == ()  # unmatched: replicated
    moshi_ttt = "transformer/layers_2/seq_modeling_block/ttt_layer/W1"
    assert tuple(spec_for(moshi_ttt, (4, 8, 8), sizes)) == ("tensor",)
    assert tuple(spec_for("layers_0/self_attn/in_proj/kernel", (16, 48), sizes)) == (
        "fsdp", "tensor")


def test_optimizer_leaves_follow_the_param_with_the_longest_matching_path():
    """``.../mu/layers_0/conv/norm/weight`` is the pre-conv norm's moment, not ``norm/weight``'s."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from ttt_jax.sharding import Layout

    class Marked(Layout):  # a distinct spec per param, to see which one a leaf picked
        def param_spec(self, path, shape):
            return P("fsdp") if path == "norm/weight" else P("tensor")

    layout = Marked(make_mesh(MeshConfig()))
    params = {"norm": {"weight": jnp.ones(4)},
              "layers_0": {"conv": {"norm": {"weight": jnp.ones(4)}}}}
    opt = {"count": jnp.zeros(()), "mu": params, "other": jnp.ones(3)}
    shardings = layout.opt_state_shardings(opt, params)
    assert shardings["mu"]["norm"]["weight"].spec == P("fsdp")
    assert shardings["mu"]["layers_0"]["conv"]["norm"]["weight"].spec == P("tensor")
    assert shardings["count"].spec == P() and shardings["other"].spec == P()


def test_batches_on_a_mesh_equal_the_plain_batches(tmp_path):
    """``Layout.train_batch`` (k micro-batches) and ``eval_view`` hold the same values as the
    unsharded path, here on a 1-device mesh (the 8-device and 2-process runs are below)."""
    import dataclasses

    from ttt_jax.data import make_dataset
    from ttt_jax.sharding import Layout
    from ttt_jax.trainer import _micro_batches

    cfg = from_dict(RunConfig, _run_dict(data=1))
    layout = Layout.from_config(dataclasses.replace(cfg, mesh=MeshConfig()))
    recall = make_dataset("recall", seq_len=12, batch_size=8, seed=0, split="train",
                          vocab_size=32, recall_num_pairs=2, recall_vocab=32)
    for accum in (1, 2, 4):
        tokens, mask = layout.train_batch(recall, 3, accum)
        want_tokens, want_mask = _micro_batches(recall, 3, accum)
        assert tokens.shape == (accum, 8 // accum, 13)
        assert tuple(tokens.sharding.spec) == (None, ("data", "fsdp"), None)
        np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
        np.testing.assert_array_equal(np.asarray(mask), want_mask)
    view = layout.eval_view(recall)
    np.testing.assert_array_equal(np.asarray(view.batch(5)), recall.batch(5))
    np.testing.assert_array_equal(np.asarray(view.loss_mask(5)), recall.loss_mask(5))
    assert view.batch_size == 8 and layout.local_rows(8) == (0, 8)


def test_distributed_settings_from_environment():
    assert distributed_settings({}) is None
    assert distributed_settings({"SLURM_NTASKS": "1"}) is None
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3"}
    assert distributed_settings(explicit) == {"coordinator_address": "10.0.0.1:1234",
                                              "num_processes": 4, "process_id": 3}
    assert distributed_settings({**explicit, "TTT_JAX_DISTRIBUTED": "0"}) is None
    auto = {"coordinator_address": None, "num_processes": None, "process_id": None}
    assert distributed_settings({"TTT_JAX_DISTRIBUTED": "1"}) == auto
    slurm = {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert distributed_settings(slurm) == auto
    assert distributed_settings({"OMPI_COMM_WORLD_SIZE": "2"}) == auto
    assert distributed_settings({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == auto
    assert distributed_settings({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
        distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 is invalid: expected an integer in "
                                         r"\[0, JAX_NUM_PROCESSES=2\)"):
        distributed_settings({**explicit, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is invalid"):
        distributed_settings({**explicit, "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="TTT_JAX_DISTRIBUTED='yes' is invalid"):
        distributed_settings({"TTT_JAX_DISTRIBUTED": "yes"})


def test_read_rows_reads_only_the_requested_rows(tmp_path):
    from ttt_jax.data import make_dataset

    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16))
    ds = make_dataset("tokens", path=str(path), seq_len=12, batch_size=8, seed=3, split="train",
                      vocab_size=64)
    rows = np.array([5, 6, 7])
    touched = []
    tokens = ds.tokens

    class Spy:  # records which token offsets are read
        shape = tokens.shape

        def __getitem__(self, idx):
            touched.append(np.asarray(idx))
            return tokens[idx]

    for step in (0, 41):
        want = ds.batch(step)[rows]
        ds.tokens = Spy()
        got, mask = read_rows(ds, step, rows)
        ds.tokens = tokens
        np.testing.assert_array_equal(got, want)
        assert mask is None and touched[-1].shape == (3, 13)
    recall = make_dataset("recall", seq_len=12, batch_size=8, seed=0, split="train",
                          vocab_size=32, recall_num_pairs=2, recall_vocab=32)
    got, mask = read_rows(recall, 2, rows)
    np.testing.assert_array_equal(got, recall.batch(2)[rows])
    np.testing.assert_array_equal(mask, recall.loss_mask(2)[rows])


# ---- multi-device runs, in subprocesses ---------------------------------------------------


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "TTT_JAX_", "XLA_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _finish(proc, what: str) -> str | None:
    """Waits for ``proc``; the tail of its output if it failed, else None."""
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    if proc.returncode == 0:
        return None
    tail = "\n".join(line for line in out.decode(errors="replace").splitlines()
                     if "rematerialization" not in line)[-3000:]
    return f"{what} exited with {proc.returncode}:\n{tail}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the 8-device run and the two 4-device processes together; their JSON results."""
    out = tmp_path_factory.mktemp("sharding")
    port = _free_port()
    cmd = [sys.executable, str(WORKER)]
    opts = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    meshes = subprocess.Popen(cmd + ["meshes", str(out)], env=_env(8), **opts)
    procs = [subprocess.Popen(cmd + ["train", str(out / "mp_run"), str(out / f"process{i}.json")],
                              env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)), **opts)
             for i in range(2)]
    failures = [_finish(meshes, "the 8-device run")]
    failures += [_finish(p, f"process {i} of the two-process run") for i, p in enumerate(procs)]
    failures = [f for f in failures if f]
    if failures:
        pytest.fail("\n\n".join(failures))
    return {"meshes": json.loads((out / "meshes.json").read_text()),
            "processes": [json.loads((out / f"process{i}.json").read_text()) for i in range(2)],
            "dir": out}


def _expected_param_specs(mesh: str) -> dict[str, str]:
    """The rules, written out by hand for the test model (V=32, d=16, I=32, H=2, f=8)."""
    names = ["embed_tokens/embedding", "norm/weight"] + [
        f"layers_0/{n}" for n in (
            "seq_norm/weight", "ffn_norm/weight", "mlp/gate_proj/kernel", "mlp/up_proj/kernel",
            "mlp/down_proj/kernel", "seq_modeling_block/q_proj/kernel",
            "seq_modeling_block/k_proj/kernel", "seq_modeling_block/v_proj/kernel",
            "seq_modeling_block/o_proj/kernel", "seq_modeling_block/W1", "seq_modeling_block/b1",
            "seq_modeling_block/ttt_norm_weight", "seq_modeling_block/ttt_norm_bias",
            "seq_modeling_block/learnable_ttt_lr_weight",
            "seq_modeling_block/learnable_ttt_lr_bias",
            "seq_modeling_block/learnable_token_idx", "seq_modeling_block/post_norm/scale",
            "seq_modeling_block/post_norm/bias")]
    if mesh == "single":
        return dict.fromkeys(names, "single")
    specs = dict.fromkeys(names, "()")
    if mesh == "data2_fsdp4":
        col, row = "('fsdp',)", "(None, 'fsdp')"
        specs["embed_tokens/embedding"] = row
    elif mesh == "data2_fsdp2_tensor2":
        col, row = "('fsdp', 'tensor')", "('tensor', 'fsdp')"
        specs["embed_tokens/embedding"] = row
        for n in ("W1", "b1", "ttt_norm_weight", "ttt_norm_bias", "learnable_ttt_lr_weight",
                  "learnable_ttt_lr_bias"):
            specs[f"layers_0/seq_modeling_block/{n}"] = "('tensor',)"
    else:
        return specs
    for n in ("mlp/gate_proj/kernel", "mlp/up_proj/kernel", "seq_modeling_block/q_proj/kernel",
              "seq_modeling_block/k_proj/kernel", "seq_modeling_block/v_proj/kernel"):
        specs[f"layers_0/{n}"] = col
    for n in ("mlp/down_proj/kernel", "seq_modeling_block/o_proj/kernel"):
        specs[f"layers_0/{n}"] = row
    return specs


MESH_NAMES = ("single", "data8", "data2_fsdp4", "data2_fsdp2_tensor2")


@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_every_leaf_is_sharded_as_the_rules_say(runs, mesh):
    run = runs["meshes"]["runs"][mesh]
    expected = _expected_param_specs(mesh)
    assert run["param_specs"] == expected
    assert run["specs_after_training"] == expected  # the step keeps the layout
    opt = run["opt_specs"]
    # Adam's moments follow their param; counters are replicated.
    for moment in ("mu", "nu"):
        assert {k.split(f"/{moment}/", 1)[1]: v for k, v in opt.items()
                if f"/{moment}/" in k} == expected
    scalars = {v for k, v in opt.items() if k.endswith("count")}
    assert scalars == {"single" if mesh == "single" else "()"}
    if mesh != "single":
        assert runs["meshes"]["devices"] == 8
        assert np.prod(list(run["mesh_shape"].values())) == 8


@pytest.mark.parametrize("mesh", MESH_NAMES[1:])
def test_losses_and_params_match_one_device(runs, mesh):
    ref = runs["meshes"]["runs"]["single"]
    run = runs["meshes"]["runs"][mesh]
    assert len(run["losses"]) == STEPS
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=RTOL)
    assert run["losses"][-1] < run["losses"][0] - 0.05  # it did train
    assert run["max_param_diff_vs_single"] < 1e-5


@pytest.mark.parametrize("target", ["data8", "single"])
def test_checkpoint_from_one_mesh_restores_on_another(runs, target):
    """Saved on (data=2, fsdp=4) after step 3; restored on (data=8) and on one device."""
    restored = runs["meshes"]["restores"][target]
    source = runs["meshes"]["runs"]["data2_fsdp4"]
    assert restored["step"] == restored["meta_step"] == SAVE_AT
    assert restored["max_abs_diff"] == 0.0  # bit-identical params
    # Placed as the target wants, not as saved.
    assert restored["param_specs"] == restored["target_param_specs"]
    assert restored["param_specs"] == _expected_param_specs(target)
    assert set(restored["opt_specs"].values()) == {"single" if target == "single" else "()"}
    np.testing.assert_allclose(restored["losses"], source["losses"][SAVE_AT:], rtol=RTOL)


def test_sharded_checkpoint_loads_on_one_device(runs):
    """``load_saved`` (export, init_from) reads an 8-device checkpoint in this 1-device process."""
    from ttt_jax.checkpoint import load_saved
    from ttt_jax.tree import flatten

    ref = np.load(runs["dir"] / "params_step3.npz")  # the single-device run after step 3
    state, meta = load_saved(runs["dir"] / "ckpt_run")
    assert meta["step"] == SAVE_AT
    params = flatten(state["params"])
    assert set(params) == set(ref.files)
    for k in ref.files:
        np.testing.assert_allclose(np.asarray(params[k]), ref[k], atol=1e-5, err_msg=k)


def test_two_processes_train_like_one(runs):
    """``train.py`` in 2 processes x 4 devices on mesh (data=2, fsdp=4), joined by
    jax.distributed over a localhost coordinator: each reads only its half of every batch, and
    the losses and the checkpoint they write match the single-process run."""
    from ttt_jax.checkpoint import load_saved
    from ttt_jax.tree import flatten

    p0, p1 = runs["processes"]
    for i, p in enumerate((p0, p1)):
        assert (p["process_index"], p["process_count"]) == (i, 2)
        assert (p["device_count"], p["local_device_count"]) == (8, 4)
        assert p["primary"] == (i == 0)
    train_reads = lambda p: [r for r in p["reads"] if r["split"] == "train"]  # noqa: E731
    assert [r["step"] for r in train_reads(p0)] == [0, 1, 2]
    for r0, r1 in zip(p0["reads"], p1["reads"]):
        assert r0["rows"] == list(range(8)) and r1["rows"] == list(range(8, 16))
    assert len(p0["reads"]) == len(p1["reads"])

    records = [json.loads(line) for line in
               (runs["dir"] / "mp_run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3]
    np.testing.assert_allclose(losses, runs["meshes"]["runs"]["single"]["losses"][:3], rtol=RTOL)

    ref = np.load(runs["dir"] / "params_step3.npz")
    state, meta = load_saved(runs["dir"] / "mp_run")
    assert meta["step"] == 3 and meta["config"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    params = flatten(state["params"])
    for k in ref.files:
        np.testing.assert_allclose(np.asarray(params[k]), ref[k], atol=1e-5, err_msg=k)
