"""Experiment tracking: model FLOPs, the metrics of a train line, TensorBoard event files read
back with TensorBoard's own reader, W&B through its API, and resume without duplicate steps."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from ttt_jax import RunConfig, flops, registry
from ttt_jax.config import apply_overrides, from_dict
from ttt_jax.trainer import run
from ttt_jax.tracking import check_trackers

PEAK_TFLOPS = 0.5


def quiet(*_args, **_kw):
    pass


# ---------------------------------------------------------------- model FLOPs

def test_flops_count_products_in_scans_branches_and_convolutions():
    a = jnp.zeros((3, 5, 7))
    w = jnp.zeros((7, 11))

    def body(carry, _):
        return carry, jnp.einsum("bij,jk->bik", a, w)  # 2 * 3*5*11 * 7 per iteration

    def fn(x, kernel):
        _, ys = jax.lax.scan(body, 0.0, None, length=4)
        z = jax.lax.cond(x.sum() > 0, lambda: a @ w @ jnp.zeros((11, 11)),  # two products
                         lambda: a @ w)
        conv = jax.lax.conv_general_dilated(x, kernel, (1,), "SAME",
                                            dimension_numbers=("NCH", "OIH", "NCH"))
        return ys, z, conv

    x, kernel = jnp.ones((2, 6, 10)), jnp.ones((4, 6, 5))
    got = flops.forward_flops(fn, x, kernel)
    want = (4 * 2 * 3 * 5 * 11 * 7                     # the scan, 4 times
            + 2 * 3 * 5 * 11 * 7 + 2 * 3 * 5 * 11 * 11  # the dearer branch
            + 2 * (2 * 4 * 10) * 6 * 5)                 # each output: 6 inputs x 5 taps
    assert got == want


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_model_flops_match_a_hand_count_of_the_dual_form(kind):
    d, vocab, inter, heads, b, layers, length = 32, 64, 48, 4, 4, 2, 16
    cfg = from_dict(RunConfig, {
        "model": {"vocab_size": vocab, "num_layers": layers, "intermediate_size": inter,
                  "tie_word_embeddings": False,
                  "ttt": {"model_dim": d, "num_heads": heads, "mini_batch_size": b,
                          "ttt_layer_type": kind, "use_rope": True}},
        "data": {"seq_len": length}})
    arch = registry.of(cfg)
    model = arch.build_model(cfg.model)
    per_token = flops.train_flops_per_token(lambda p, x: model.apply({"params": p}, x),
                                            arch.param_shapes(cfg.model),
                                            arch.sample_input(cfg.model, 2, length)) / 3
    f = d // heads
    # Products per token: Q, K, V, O projections and the SwiGLU FFN per layer, the LM head,
    # the per-head learning-rate gate; per head the inner model on keys and queries, its
    # gradient, the update of its weights, and the causal b x b terms of the dual form.
    dense = layers * (4 * 2 * d * d + 3 * 2 * d * inter + 2 * d * heads) + 2 * d * vocab
    if kind == "linear":
        inner = 6 * f * f + 4 * b * f
    else:
        h = 4 * f
        inner = 14 * f * h + 6 * b * f + 6 * b * h
    want = dense + layers * heads * inner
    assert abs(per_token / want - 1) < 0.05, (per_token, want)


def test_peak_flops_from_the_setting_or_the_device_table():
    assert flops.peak_flops(2.5) == 2.5e12
    cpu = jax.devices("cpu")[0]
    assert flops.peak_flops(None, cpu) is None  # no MFU on a CPU unless a peak is set
    fake = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert flops.peak_flops(None, fake) == 989e12


# ---------------------------------------------------------------- a small run

def small_config(run_dir, *overrides) -> RunConfig:
    cfg = from_dict(RunConfig, {
        "model": {"vocab_size": 256, "num_layers": 1, "intermediate_size": 32,
                  "ttt": {"model_dim": 16, "num_heads": 2, "mini_batch_size": 8}},
        "optim": {"learning_rate": 0.01, "warmup_steps": 3, "min_lr_ratio": 0.2},
        "data": {"seq_len": 32, "batch_size": 4},
        "train": {"steps": 10, "eval_every": 4, "eval_batches": 1, "log_every": 2,
                  "run_dir": str(run_dir), "peak_tflops": PEAK_TFLOPS},
        "checkpoint": {"every": 5, "keep": 5}})
    return apply_overrides(cfg, list(overrides))


def hand_lr(step: int, peak=0.01, warmup=3, total=14, floor=0.2) -> float:
    """The learning rate of update ``step`` (0-based): linear warmup, cosine to ``floor``."""
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return peak * floor + (peak - peak * floor) * 0.5 * (1 + math.cos(math.pi * t))


def read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, through TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run of 14 steps (checkpoints 5, 10, 14) as if killed after it logged step 14 but
    before it saved anything after step 5 (checkpoints 10 and 14 removed), then resumed from
    step 5 to 14; the first run's ``plot_losses`` calls are recorded."""
    import ttt_jax.trainer as trainer

    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    plots = []
    real = trainer.plot_losses

    def recording(records, path):
        plots.append(max(r["step"] for r in records))
        real(records, path)

    trainer.plot_losses = recording
    try:
        run(small_config(run_dir, "train.steps=14", "train.log_every=1",
                         "train.diagnostics_every=7"), print_fn=quiet)
    finally:
        trainer.plot_losses = real
    first = jsonl(run_dir)
    events_first = read_events(run_dir)
    for step in (10, 14):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    run(small_config(run_dir, "train.steps=14", "train.log_every=1"), print_fn=quiet)
    return run_dir, first, events_first, plots


def test_train_lines_hold_lr_step_time_tokens_per_s_and_mfu(resumed):
    run_dir, first, _, _ = resumed
    train = [r for r in first if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 15))
    for r in train:
        assert r["lr"] == pytest.approx(hand_lr(r["step"] - 1), rel=1e-5, abs=1e-9), r
    # the first step compiles: reported once as compile_s, and timed steps start after it
    assert "compile_s" in train[0] and "tokens_per_s" not in train[0]
    assert all("compile_s" not in r for r in train[1:])
    timed = train[1:]
    for r in timed:
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"])
        assert 0 < r["mfu"] < 1
    # one ratio throughout: mfu * peak / (tokens/s) is the run's model FLOPs per token
    per_token = {round(r["mfu"] * PEAK_TFLOPS * 1e12 / r["tokens_per_s"]) for r in timed}
    assert len(per_token) == 1
    evals = [r for r in first if r["kind"] == "eval"]
    for r in evals:  # bytes: one byte per token
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))


def test_loss_png_is_redrawn_at_every_evaluation(resumed):
    _, first, _, plots = resumed
    eval_steps = [r["step"] for r in first if r["kind"] == "eval" and r["step"] > 0]
    assert plots[:len(eval_steps)] == eval_steps  # redrawn as each evaluation is written
    assert (resumed[0] / "loss.png").stat().st_size > 0


def test_event_files_hold_the_jsonl_scalars_with_no_step_twice(resumed):
    run_dir, first, events_first, _ = resumed
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/step_time_s", "train/mfu", "eval/val_loss", "eval/val_bpb",
                "ttt/layer_0/w0", "ttt/layer_0/before", "ttt/layer_0/after"):
        assert tag in events_first, tag
    diagnostics = [r for r in first if r["kind"] == "ttt_diagnostics"]
    assert [r["step"] for r in diagnostics] == [7, 14]
    for r in diagnostics:
        assert dict(events_first["ttt/layer_0/after"])[r["step"]] == pytest.approx(
            r["layers"][0]["after"], rel=1e-6)
    # the first run: every scalar of metrics.jsonl, at its step, and nothing else
    want = {}
    for r in first:
        for key, value in r.items():
            if key not in ("kind", "step") and isinstance(value, float):
                want[(f"{r['kind']}/{key}", r["step"])] = value
        for i, layer in enumerate(r.get("layers", [])):  # ttt_diagnostics: one dict per layer
            for key, value in layer.items():
                want[(f"ttt/layer_{i}/{key}", r["step"])] = value
    got = {(tag, step): value for tag, points in events_first.items() for step, value in points}
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key

    # after the resume from step 5: one value per step, those after 5 from the resumed run
    events = read_events(run_dir)
    final = jsonl(run_dir)
    for tag, points in events.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), (tag, steps)
    assert [s for s, _ in events["train/loss"]] == list(range(1, 15))
    resumed_loss = {r["step"]: r["loss"] for r in final if r["kind"] == "train"}
    for step, value in events["train/loss"]:
        assert value == pytest.approx(resumed_loss[step], rel=1e-6), step
    # the resumed run validates at its first step, 5, which the first run had not
    assert [s for s, _ in events["eval/val_loss"]] == [0, 4, 5, 8, 12, 14]
    assert [r["step"] for r in final if r["kind"] == "eval"] == [0, 4, 5, 8, 12, 14]


def test_wandb_receives_the_same_scalars_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "train.trackers=[jsonl, wandb]", "train.steps=6")
    run(cfg, print_fn=quiet)
    inits = [c for c in calls if c[0] == "init"]
    assert len(inits) == 1 and inits[0][1]["resume"] == "allow"
    run_id = inits[0][1]["id"]
    assert json.loads((run_dir / "wandb.json").read_text())["id"] == run_id
    logged = {(step, tag): v for c in calls if c[0] == "log" for step, vals in [c[1:]]
              for tag, v in vals.items()}
    for r in jsonl(run_dir):
        if r["kind"] == "train":
            assert logged[(r["step"], "train/loss")] == pytest.approx(r["loss"])
            assert logged[(r["step"], "train/lr")] == pytest.approx(r["lr"])
    assert calls[-1] == ("finish",)
    assert not (run_dir / "tensorboard").exists()

    # killed after logging step 6 but before saving it: resumed from 5, W&B already holds 5, 6
    shutil.rmtree(run_dir / "checkpoints" / "6")
    calls.clear()
    run(small_config(run_dir, "train.trackers=[jsonl, wandb]", "train.steps=8"),
        print_fn=quiet)
    assert [c[1]["id"] for c in calls if c[0] == "init"] == [run_id]
    assert sorted({c[1] for c in calls if c[0] == "log"}) == [8]


def test_tracker_choices_are_checked_with_the_key_named(monkeypatch):
    with pytest.raises(ValueError, match=r"train\.trackers=.*contains jsonl"):
        small_config("/tmp/unused", "train.trackers=[tensorboard]")
    with pytest.raises(ValueError, match=r"train\.trackers=.*wandb"):
        small_config("/tmp/unused", "train.trackers=[jsonl, comet]")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match=r"train\.trackers includes wandb, but the wandb "
                                         r"package is not installed: pip install"):
        check_trackers(("jsonl", "wandb"))
    check_trackers(("jsonl", "tensorboard"))
