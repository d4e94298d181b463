"""Runs sharded training in a fresh process with fake CPU devices; used by tests/test_sharding.py.

The device count must be fixed before JAX is imported, so the tests start this script as a
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in its environment) and
read the JSON it writes.

  python tests/sharding_worker.py meshes OUT_DIR
      8 devices, one process. From the same initial state, 5 steps on a single device and on
      meshes (data=8), (data=2, fsdp=4), (data=2, fsdp=2, tensor=2); every param and optimizer
      leaf's sharding; a checkpoint saved on (data=2, fsdp=4) after step 3 restored on
      (data=8) and on one device, then trained on. Writes OUT_DIR/meshes.json and the
      single-device params after step 3 to OUT_DIR/params_step3.npz.

  python tests/sharding_worker.py moshi OUT_DIR
      8 devices, one process. A scaled-down MoshiLM (architecture moshi_lm: 2 temporal layers
      of width 32 with a TTT layer, a depformer, text + 2 audio streams), 3 AdamW steps on one
      device (remat none) and, with model.remat=layer, on meshes (fsdp=8), (fsdp=2, tensor=4),
      (tensor=8); a checkpoint saved on (fsdp=8) after step 2 restored on (tensor=8) and on
      one device, then step 3; and the same model with persistent states (the carried rows
      split over fsdp=8) against one device for 3 steps. Writes OUT_DIR/moshi.json.

  python tests/sharding_worker.py train RUN_DIR OUT_JSON
      ``train.py`` on the same config with mesh (data=2, fsdp=4) for 3 steps; started once per
      process with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set, so
      ``jax.distributed`` joins the processes. Writes which batch rows this process read.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 5
SAVE_AT = 3
# Constant learning rate (no warmup, no decay) so that the first k steps of any run agree
# whatever its total step count.
OVERRIDES = [
    "model.vocab_size=32", "model.num_layers=1", "model.intermediate_size=32",
    "model.ttt.model_dim=16", "model.ttt.num_heads=2", "model.ttt.mini_batch_size=4",
    "data.source=recall", "data.recall_vocab=32", "data.recall_num_pairs=2",
    "data.seq_len=8", "data.batch_size=16",
    "optim.learning_rate=0.01", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
    "optim.eps=0.001",
    f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=100", "train.eval_batches=1",
]
MESHES = {"single": None, "data8": dict(data=8), "data2_fsdp4": dict(data=2, fsdp=4),
          "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


def base_config(*extra: str):
    from ttt_jax import apply_overrides, load_config

    root = Path(__file__).resolve().parents[1]
    return apply_overrides(load_config(root / "configs" / "tiny.yaml"), OVERRIDES + list(extra))


def specs(tree) -> dict[str, str]:
    """``path -> str(PartitionSpec)`` of every array leaf (``single`` when not on a mesh)."""
    from ttt_jax.tree import flatten

    out = {}
    for k, leaf in flatten(tree).items():
        spec = getattr(leaf.sharding, "spec", None)
        out[k] = "single" if spec is None else str(tuple(spec))
    return out


def single_setup(step_fn, train_ds) -> dict:
    """How one device runs: state placement, the jitted step and the batches."""
    import jax

    from ttt_jax.trainer import _micro_batches

    return dict(place=lambda s: jax.device_put(s, jax.devices()[0]),
                step=jax.jit(step_fn, donate_argnums=0),
                batch=lambda i: _micro_batches(train_ds, i, 1))


def mesh_setup(cfg, mesh: dict, step_fn, train_ds, host_init) -> dict:
    """The same on ``cfg`` with ``mesh`` (its ``Layout`` under ``layout``)."""
    from ttt_jax.config import MeshConfig
    from ttt_jax.sharding import Layout

    layout = Layout.from_config(dataclasses.replace(cfg, mesh=MeshConfig(**mesh)))
    return dict(place=layout.place_state, layout=layout,
                batch=lambda i: layout.train_batch(train_ds, i, 1),
                step=layout.jit_train_step(step_fn, layout.place_state(host_init)))


def new_record(setup: dict, state) -> dict:
    """A run's record before training: the shardings it starts with, and its mesh."""
    run = {"param_specs": specs(state.params), "opt_specs": specs(state.opt_state), "losses": []}
    if "layout" in setup:
        run["mesh_shape"] = dict(setup["layout"].mesh.shape)
    return run


def run_meshes(out_dir: Path) -> None:
    import jax
    import numpy as np

    from ttt_jax import training
    from ttt_jax.checkpoint import Checkpointer
    from ttt_jax.models.ttt_lm import TTTLM
    from ttt_jax.registry import of
    from ttt_jax.tree import flatten

    cfg = base_config()
    train_ds, _ = of(cfg).build_datasets(cfg)
    model = TTTLM(cfg.model)
    optimizer = training.make_optimizer(cfg.optim, STEPS)
    init = jax.jit(lambda k: of(cfg).init_state(cfg, optimizer, k))
    host_init = jax.device_get(init(jax.random.PRNGKey(cfg.train.seed)))
    step_fn = training.make_train_step(model, optimizer)
    ckpt_dir = out_dir / "ckpt_run"

    setups = {name: single_setup(step_fn, train_ds) if mesh is None else
              mesh_setup(cfg, mesh, step_fn, train_ds, host_init)
              for name, mesh in MESHES.items()}

    result = {"devices": jax.device_count(), "runs": {}}
    finals, saved_params = {}, None
    for name, s in setups.items():
        state = s["place"](host_init)
        run = new_record(s, state)
        if "layout" in s:
            run["local_rows"] = list(s["layout"].local_rows(cfg.data.batch_size))
        for i in range(STEPS):
            state, metrics = s["step"](state, *s["batch"](i))
            run["losses"].append(float(metrics["loss"]))
            if i + 1 == SAVE_AT and name == "single":
                np.savez(out_dir / "params_step3.npz", **{
                    k: np.asarray(v) for k, v in flatten(jax.device_get(state.params)).items()})
            if i + 1 == SAVE_AT and name == "data2_fsdp4":
                ckpt = Checkpointer(ckpt_dir, every=1000, keep=2)
                ckpt.save(state, cfg, force=True)
                ckpt.close()
                saved_params = jax.device_get(state.params)
        run["specs_after_training"] = specs(state.params)
        finals[name] = jax.device_get(state.params)
        result["runs"][name] = run

    ref = flatten(finals["single"])
    for name in MESHES:
        other = flatten(finals[name])
        result["runs"][name]["max_param_diff_vs_single"] = max(
            float(np.max(np.abs(np.asarray(other[k]) - np.asarray(ref[k])))) for k in ref)

    # Restore the (data=2, fsdp=4) checkpoint onto other meshes, then keep training.
    result["restores"] = {}
    saved = flatten(saved_params)
    for name in ("data8", "single"):
        s = setups[name]
        target = s["place"](host_init)
        ckpt = Checkpointer(ckpt_dir, every=1000, keep=2)
        state, meta = ckpt.restore_latest(target, log=lambda msg: None)
        ckpt.close()
        restored = flatten(jax.device_get(state.params))
        entry = {"step": int(state.step), "meta_step": meta["step"],
                 "param_specs": specs(state.params), "opt_specs": specs(state.opt_state),
                 "target_param_specs": specs(target.params),
                 "max_abs_diff": max(float(np.max(np.abs(np.asarray(restored[k])
                                                         - np.asarray(saved[k]))))
                                     for k in saved),
                 "losses": []}
        for i in range(SAVE_AT, STEPS):
            state, metrics = s["step"](state, *s["batch"](i))
            entry["losses"].append(float(metrics["loss"]))
        result["restores"][name] = entry
    (out_dir / "meshes.json").write_text(json.dumps(result, indent=1))


MOSHI_STEPS, MOSHI_SAVE_AT = 3, 2
MOSHI_OVERRIDES = [
    "model.transformer.d_model=32", "model.transformer.num_heads=4",
    "model.transformer.num_layers=2", "model.transformer.dim_feedforward=64",
    "model.depformer.weights_per_step=false", "model.depformer.multi_linear=false",
    "model.transformer.context=8", "model.ttt.layers='1'", "model.ttt.mini_batch_size=4",
    "model.depformer.d_model=16", "model.depformer.num_heads=2", "model.depformer.num_layers=1",
    "model.depformer.dim_feedforward=[32]", "model.n_q=2", "model.dep_q=2", "model.card=8",
    "model.text_card=16", "model.delays=[0, 0, 1]",
    "data.source=synthetic", "data.seq_len=7", "data.batch_size=8",
    "optim.learning_rate=0.01", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
    "optim.eps=0.001", f"train.steps={MOSHI_STEPS}",
]
# (fsdp, tensor) sizes; data is 1 throughout.
MOSHI_MESHES = {"fsdp8": dict(data=1, fsdp=8), "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4),
                "tensor8": dict(data=1, tensor=8)}


def moshi_config(*extra: str):
    from ttt_jax.cli.presets import load

    return load("moshi_lm_tiny", MOSHI_OVERRIDES + list(extra))


def run_moshi(out_dir: Path) -> None:
    import jax
    import numpy as np

    from ttt_jax import training
    from ttt_jax.checkpoint import Checkpointer
    from ttt_jax.registry import of
    from ttt_jax.tree import flatten

    cfg = moshi_config()
    arch = of(cfg)
    train_ds, _ = arch.build_datasets(cfg)
    optimizer = arch.make_optimizer(cfg)
    host_init = jax.device_get(jax.jit(lambda k: arch.init_state(cfg, optimizer, k))(
        jax.random.PRNGKey(cfg.train.seed)))
    rcfg = moshi_config("model.remat=layer")

    setups = {"single": single_setup(
        training.make_train_step(arch.build_model(cfg.model), optimizer), train_ds)}
    step_fn = training.make_train_step(arch.build_model(rcfg.model), optimizer)
    for name, mesh in MOSHI_MESHES.items():
        setups[name] = mesh_setup(rcfg, mesh, step_fn, train_ds, host_init)

    result = {"devices": jax.device_count(), "runs": {}, "restores": {}, "seconds": {}}
    finals, saved = {}, None
    ckpt_dir = out_dir / "moshi_ckpt"
    for name, s in setups.items():
        state = s["place"](host_init)
        run = new_record(s, state)
        start = time.time()
        for i in range(MOSHI_STEPS):
            state, metrics = s["step"](state, *s["batch"](i))
            run["losses"].append(float(metrics["loss"]))
            if i == 0:
                result["seconds"][name] = time.time() - start
            if i + 1 == MOSHI_SAVE_AT and name == "fsdp8":
                ckpt = Checkpointer(ckpt_dir, every=1000, keep=2)
                ckpt.save(state, rcfg, force=True)
                ckpt.close()
                saved = flatten(jax.device_get(state.params))
        run["specs_after_training"] = specs(state.params)
        finals[name] = flatten(jax.device_get(state.params))
        result["runs"][name] = run
    for name in setups:
        result["runs"][name]["max_param_diff_vs_single"] = max(
            float(np.max(np.abs(np.asarray(finals[name][k]) - np.asarray(v))))
            for k, v in finals["single"].items())

    for name in ("tensor8", "single"):
        s = setups[name]
        ckpt = Checkpointer(ckpt_dir, every=1000, keep=2)
        state, meta = ckpt.restore_latest(s["place"](host_init), log=lambda msg: None)
        ckpt.close()
        restored = flatten(jax.device_get(state.params))
        entry = {"step": int(state.step), "param_specs": specs(state.params),
                 "max_abs_diff": max(float(np.max(np.abs(np.asarray(restored[k]) - saved[k])))
                                     for k in saved), "losses": []}
        for i in range(MOSHI_SAVE_AT, MOSHI_STEPS):
            state, metrics = s["step"](state, *s["batch"](i))
            entry["losses"].append(float(metrics["loss"]))
        final = flatten(jax.device_get(state.params))
        entry["max_param_diff_vs_single"] = max(
            float(np.max(np.abs(np.asarray(final[k]) - np.asarray(v))))
            for k, v in finals["single"].items())
        result["restores"][name] = entry
    result["persistent"] = run_persistent(out_dir)
    (out_dir / "moshi.json").write_text(json.dumps(result, indent=1))


def run_persistent(out_dir: Path) -> dict:
    """Persistent states (the carried rows split over fsdp=8) against one device: 3 steps on
    motifs recordings, each row continuing its recording."""
    import jax
    import numpy as np

    from ttt_jax import training
    from ttt_jax.registry import of
    from ttt_jax.tree import flatten

    cfg = moshi_config("model.ttt.persistent_states=true", "data.source=motifs",
                       "data.recordings=8", "data.recording_frames=40")
    arch = of(cfg)
    train_ds, _ = arch.build_datasets(cfg)
    optimizer = arch.make_optimizer(cfg)
    host_init = jax.device_get(jax.jit(lambda k: arch.init_state(cfg, optimizer, k))(
        jax.random.PRNGKey(cfg.train.seed)))
    step_fn = training.make_train_step(arch.build_model(cfg.model), optimizer)
    one = single_setup(step_fn, train_ds)
    mesh = mesh_setup(cfg, dict(data=1, fsdp=8), step_fn, train_ds, host_init)
    single, sharded = one["place"](host_init), mesh["place"](host_init)
    out = {"single": [], "fsdp8": [],
           "carry_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(sharded.carry)})}
    for i in range(MOSHI_STEPS):
        single, m1 = one["step"](single, *one["batch"](i))
        sharded, m2 = mesh["step"](sharded, *mesh["batch"](i))
        out["single"].append(float(m1["loss"]))
        out["fsdp8"].append(float(m2["loss"]))
    a, b = flatten(jax.device_get(single.carry)), flatten(jax.device_get(sharded.carry))
    out["max_carry_diff"] = max(float(np.max(np.abs(np.asarray(a[k], np.float64)
                                                    - np.asarray(b[k], np.float64)))) for k in a)
    out["carry_rows"] = int(jax.tree.leaves(single.carry)[0].shape[0])
    return out


def run_train(run_dir: Path, out_json: Path) -> None:
    """``train.py``'s ``main`` on this process, recording which batch rows it read."""
    import importlib.util

    from ttt_jax import save_config, sharding

    reads = []
    original = sharding.read_rows

    def recording(ds, step, rows):
        reads.append({"split": ds.split, "step": int(step), "rows": [int(r) for r in rows]})
        return original(ds, step, rows)

    sharding.read_rows = recording
    cfg = base_config("mesh={data: 2, fsdp: 4}", "train.steps=3", f"train.run_dir={run_dir}")
    config_path = out_json.with_suffix(".yaml")
    save_config(cfg, config_path)
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_entry", root / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    code = entry.main(["--config", str(config_path)])
    if code != 0:
        raise SystemExit(f"train.py exited with {code}")

    import jax

    from ttt_jax import distributed

    out_json.write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "primary": distributed.is_primary(), "reads": reads}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "meshes":
        run_meshes(Path(sys.argv[2]))
    elif mode == "moshi":
        run_moshi(Path(sys.argv[2]))
    elif mode == "train":
        run_train(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: expected meshes, moshi or train")
