"""Long-context evaluation (``ttt_jax.evals``): the CLI on a tiny checkpoint, the options,
chunked == one-shot scoring, position buckets, recall at distance, a Moshi-TTT run's loss by
position against one full forward, the TTT inner-loss diagnostics against a naive numpy
computation, the unbounded-RoPE ablation, the sliding-window attention baseline and the
experiment configs.

Params are drawn on the host from the models' param shapes (no compiled init), so the compiled
functions are the ones under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt_jax import ModelConfig, RunConfig, TTTConfig, evals, load_config
from ttt_jax import registry
from ttt_jax.config import DataConfig, TrainConfig, apply_overrides, from_dict, to_dict
from ttt_jax.diagnostics import inner_losses
from ttt_jax.evals import cli
from ttt_jax.math.rope import apply_bounded_rope
from ttt_jax.math.ttt import ttt_dual
from ttt_jax.models import build_model
from ttt_jax.models.attention_lm import AttentionLM, context_needed, sliding_window_attention

REPO = Path(__file__).resolve().parents[1]
# The long-context study of docs/long_context.md; the moshi_motifs_* configs are docs/moshi.md's.
EXPERIMENTS = sorted(p for p in (REPO / "configs" / "experiments").glob("*.yaml")
                     if not p.name.startswith("moshi_"))
MOSHI_STUDY = sorted((REPO / "configs" / "experiments").glob("moshi_motifs_*.yaml"))
DIM, HEADS, MINI_BATCH, VOCAB = 16, 2, 4, 256
TTT_LM, ATTENTION_LM = registry.get("ttt_lm"), registry.get("attention_lm")
# Host-drawn params: values around the initialisers' (norm gains near 1, the gating alpha
# near its initial 0.1, the rest small).
CENTRES = {"alpha": 1.0, "scale": 1.0, "ttt_norm_weight": 1.0, "gating_alpha": 0.1}


def model_config(**kw):
    ttt = dict(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH)
    ttt.update(kw.pop("ttt", {}))
    return ModelConfig(vocab_size=kw.pop("vocab_size", VOCAB), num_layers=2,
                       intermediate_size=32, ttt=TTTConfig(**ttt), **kw)


def host_params(arch, model_cfg, seed=0, std=0.1):
    """Params of ``arch.build_model(model_cfg)`` drawn with numpy (nothing compiled)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        centre = CENTRES.get(path[-1].key, 0.0)
        return jnp.asarray(centre + std * rng.standard_normal(s.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, arch.param_shapes(model_cfg))


def save_run(run_dir, cfg, params):
    """A training checkpoint at step 0 of ``cfg`` holding ``params`` (as the trainer saves)."""
    from ttt_jax import training
    from ttt_jax.checkpoint import Checkpointer

    state = training.new_state(params, registry.of(cfg).make_optimizer(cfg))
    ckpt = Checkpointer(run_dir, every=1, keep=1)
    ckpt.save(state, cfg, force=True)
    ckpt.close()
    return run_dir


def random_tokens(shape, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


# ------------------------------------------------------------------------------ arguments


def test_parse_sizes():
    assert evals.parse_sizes("512,1k,2K,1k", "--lengths") == (512, 1024, 2048)
    assert evals.parse_size("1m") == 1 << 20
    for bad in ("0", "-3", "1g", "abc", ""):
        with pytest.raises(ValueError, match="length"):
            evals.parse_size(bad)
    with pytest.raises(ValueError, match="--lengths: entry '1x'"):
        evals.parse_sizes("512,1x", "--lengths")


def test_options_are_validated_and_name_the_option():
    opts = evals.EvalOptions(lengths=[96, 32, 32], recall_distances=(30, 4))
    assert opts.lengths == (32, 96) and opts.longest == 96 and opts.recall_distances == (4, 30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.chunk = 3
    for kwargs, named in ((dict(num_sequences=0), "num_sequences=0 (--num-sequences)"),
                          (dict(batch=True), "batch=True (--batch)"),
                          (dict(chunk=-1), "chunk=-1 (--chunk)"),
                          (dict(lengths=()), "lengths=() (--lengths)"),
                          (dict(lengths="512"), "lengths='512' (--lengths)"),
                          (dict(recall_distances=[1, 8]), "recall_distances=[1, 8]"),
                          (dict(recall="yes"), "recall='yes' (--recall)"),
                          (dict(diagnostics_length=0), "diagnostics_length=0")):
        with pytest.raises(ValueError, match=re.escape(named)):
            evals.EvalOptions(**kwargs)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 100, 128, 1000, 8192])
def test_buckets_are_monotone_and_cover_every_position(length):
    buckets = evals.position_buckets(length)
    assert buckets[0][0] == 0 and buckets[-1][1] == length
    for (s0, e0), (s1, e1) in zip(buckets, buckets[1:]):
        assert e0 == s1
    assert all(s < e for s, e in buckets)
    # doubling edges: [0, 64), [64, 128), [128, 256), ...
    assert [s for s, _ in buckets[1:]] == [64 * 2 ** i for i in range(len(buckets) - 1)]


def test_default_recall_distances_reach_16x():
    assert evals.default_recall_distances(256) == [4, 16, 64, 256, 1024, 4096]
    assert max(evals.default_recall_distances(100)) == 1600


# ------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def unbounded_ttt():
    """A TTT-LM with plain RoPE: chunked scoring is exact only if positions carry over."""
    cfg = model_config(ttt=dict(use_rope=True, rope_bounded=False, rope_theta=50.0))
    return cfg, host_params(TTT_LM, cfg)


def test_chunked_equals_one_shot_ttt(unbounded_ttt):
    cfg, params = unbounded_ttt
    tokens = random_tokens((2, 43))  # chunks of 6 start at every phase of the mini-batch (b=4)
    full_loss, full_pred = evals.Scorer(TTT_LM, cfg, params, chunk=0).score(tokens)
    loss, pred = evals.Scorer(TTT_LM, cfg, params, chunk=6).score(tokens)
    assert loss.shape == pred.shape == (2, 42)
    np.testing.assert_allclose(loss, full_loss, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(pred, full_pred)


def test_chunked_equals_one_shot_swa():
    cfg = model_config(seq_modeling="swa", attention_window=5, pre_conv=True)
    params = host_params(ATTENTION_LM, cfg)
    tokens = random_tokens((2, 41), seed=1)
    full_loss, _ = evals.Scorer(ATTENTION_LM, cfg, params, chunk=0).score(tokens)
    loss, _ = evals.Scorer(ATTENTION_LM, cfg, params, chunk=7).score(tokens)
    np.testing.assert_allclose(loss, full_loss, atol=2e-5, rtol=1e-5)
    # 2 layers x (window - 1 + conv_kernel - 1): one window is not enough
    assert context_needed(cfg) == 14


def test_sliding_window_attention_matches_naive():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 2, 23, 8)).astype(np.float32) for _ in range(3))
    attend = jax.jit(sliding_window_attention, static_argnums=3)
    for window in (4, 40):  # several blocks; one block
        out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window)
        ref = np.zeros_like(q, dtype=np.float64)
        for i in range(23):
            js = [j for j in range(23) if 0 <= i - j < window]
            s = np.einsum("bhf,bhjf->bhj", q[:, :, i], k[:, :, js]) / np.sqrt(8)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            ref[:, :, i] = np.einsum("bhj,bhjf->bhf", p, v[:, :, js])
        np.testing.assert_allclose(out, ref, atol=1e-5)


# ------------------------------------------------------------------------------ RoPE ablation


def test_unbounded_rope_matches_hand_rotation_at_large_positions():
    """Plain RoPE rotates pair (2k, 2k+1) by p * theta^(-2k/f), p far past any table."""
    f, theta = 8, 10000.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 5, f)).astype(np.float32)
    pos = np.array([[0, 3, 1000, 4099, 20_000]])
    xq, _ = apply_bounded_rope(jnp.asarray(x), jnp.asarray(x), jnp.asarray(pos),
                               mini_batch_size=4, theta=theta, layout="interleaved",
                               bounded=False)
    want = np.array(x, np.float64)
    for t, p in enumerate(pos[0]):
        for kk in range(f // 2):
            angle = p * theta ** (-2 * kk / f)
            a, b = x[..., t, 2 * kk].astype(np.float64), x[..., t, 2 * kk + 1].astype(np.float64)
            want[..., t, 2 * kk] = a * np.cos(angle) - b * np.sin(angle)
            want[..., t, 2 * kk + 1] = a * np.sin(angle) + b * np.cos(angle)
    # float32 angles at p = 20000 carry ~1e-3 rad of rounding, as in every float32 RoPE
    np.testing.assert_allclose(xq, want, atol=5e-3)
    bounded, _ = apply_bounded_rope(jnp.asarray(x), jnp.asarray(x), jnp.asarray(pos),
                                    mini_batch_size=4, theta=theta, layout="interleaved")
    np.testing.assert_allclose(bounded[:, :, :2], xq[:, :, :2], atol=1e-6)  # p < b: same
    assert not np.allclose(bounded[:, :, 2:], xq[:, :, 2:], atol=1e-3)


def test_rope_bounded_is_a_strict_bool_and_defaults_true():
    assert TTTConfig(model_dim=DIM, num_heads=HEADS).rope_bounded is True
    data = {"model": {"vocab_size": 8, "num_layers": 1, "intermediate_size": 8,
                      "ttt": {"model_dim": DIM, "num_heads": HEADS, "rope_bounded": "no"}}}
    with pytest.raises(ValueError, match="model.ttt.rope_bounded"):
        from_dict(RunConfig, data)
    with pytest.raises(ValueError, match="rope_bounded"):
        TTTConfig(model_dim=DIM, num_heads=HEADS, rope_bounded=1)
    with pytest.raises(ValueError, match="seq_modeling"):
        model_config(seq_modeling="lstm")
    with pytest.raises(ValueError, match="attention_window"):
        model_config(attention_window=0)


def test_export_refuses_unbounded_rope_and_attention():
    from ttt_jax.export.torch import check_exportable

    with pytest.raises(ValueError, match="rope_bounded"):
        check_exportable(model_config(ttt=dict(use_rope=True, rope_bounded=False)))
    with pytest.raises(ValueError, match="seq_modeling"):
        check_exportable(model_config(seq_modeling="swa"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_configs_parse_and_round_trip(path):
    cfg = load_config(path)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert cfg.data.seq_len == (256 if cfg.data.source == "bytes" else 128)
    assert cfg.train.run_dir == f"runs/experiments/{path.stem}"
    assert isinstance(build_model(cfg.model), AttentionLM) == (cfg.model.seq_modeling == "swa")


def test_the_long_audio_study_differs_only_in_the_sequence_layer_and_the_carried_state():
    from ttt_jax.config import to_dict

    cfgs = {p.stem.removeprefix("moshi_motifs_"): load_config(p) for p in MOSHI_STUDY}
    assert set(cfgs) == {"attention"} | {f"ttt_{r}{s}" for r in ("norope", "unbounded", "bounded")
                                         for s in ("", "_persistent")}
    base = to_dict(cfgs["ttt_bounded_persistent"])
    for name, cfg in cfgs.items():
        ttt = cfg.model.ttt
        assert cfg.architecture == "moshi_lm" and cfg.data.source == "motifs"
        assert cfg.train.run_dir == f"runs/moshi_motifs_{name}"
        assert ttt.persistent_states == name.endswith("_persistent")
        assert ttt.enable == (name != "attention")
        if ttt.enable:
            assert (ttt.use_rope, ttt.rope_bounded) == (
                "norope" not in name, "unbounded" not in name)
        other = to_dict(cfg)
        assert {k: v for k, v in other["model"].items() if k != "ttt"} == {
            k: v for k, v in base["model"].items() if k != "ttt"}
        assert other["data"] == base["data"] and other["optim"] == base["optim"]


def test_experiment_set_is_complete():
    names = {p.stem for p in EXPERIMENTS}
    for task in ("bytes", "recall"):
        for v in ("ttt_norope", "ttt_rope_bounded", "ttt_rope_unbounded", "swa"):
            assert f"{task}_{v}" in names


# ------------------------------------------------------------------------------ diagnostics


def naive_inner_losses(W, b, xk, xv, lr, token_idx, lnw, lnb):
    """One head, TTT-Linear, float64 numpy; gradients by central finite differences."""

    def ln(z):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-6) * lnw + lnb

    def loss(Wb, t):
        W_, b_ = Wb[:-1], Wb[-1]
        return 0.5 * np.sum((ln(xk[t] @ W_ + b_) - (xv[t] - xk[t])) ** 2)

    def grad(Wb, t, h=1e-6):
        g = np.zeros_like(Wb)
        for idx in np.ndindex(Wb.shape):
            e = np.zeros_like(Wb)
            e[idx] = h
            g[idx] = (loss(Wb + e, t) - loss(Wb - e, t)) / (2 * h)
        return g

    bsz = len(token_idx)
    tok = np.maximum(0.0, 1.0 / np.arange(1, bsz + 1) + token_idx)
    state = np.concatenate([W, b[None]], axis=0)  # [f + 1, f]: the bias as a last row
    w0 = [loss(state, t) for t in range(len(xk))]
    before, after = [], []
    for s in range(0, len(xk), bsz):
        ts = range(s, min(s + bsz, len(xk)))
        before += [loss(state, t) for t in ts]
        last = tok[len(ts) - 1]
        new = state - sum(last * lr[t] * grad(state, t) for t in ts)
        after += [loss(new, t) for t in ts]
        state = new
    return np.array(w0), np.array(before), np.array(after), state


def test_inner_losses_match_naive_numpy():
    rng = np.random.default_rng(3)
    f, length, b = 4, 10, MINI_BATCH  # 2 whole mini-batches and a partial one
    W = rng.normal(size=(1, f, f)) * 0.3
    bias = rng.normal(size=(1, 1, f)) * 0.1
    xq, xk, xv = (rng.normal(size=(1, 1, length, f)) for _ in range(3))
    lr = rng.uniform(0.05, 0.3, size=(1, 1, length))
    token_idx = rng.normal(size=(b,)) * 0.05
    lnw, lnb = 1 + 0.1 * rng.normal(size=(1, f)), 0.1 * rng.normal(size=(1, f))
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = [as32(a) for a in (xq, xk, xv, lr, token_idx, lnw, lnb)]
    params = ((as32(W), as32(bias)),)
    got, state = jax.jit(inner_losses)(params, *args)
    w0, before, after, final = naive_inner_losses(W[0], bias[0, 0], xk[0, 0], xv[0, 0],
                                                  lr[0, 0], token_idx, lnw[0], lnb[0])
    for key, want in (("w0", w0), ("before", before), ("after", after)):
        np.testing.assert_allclose(got[key][0, 0], want, rtol=2e-4, atol=2e-5, err_msg=key)
    np.testing.assert_allclose(state[0][0][0, 0], final[:-1], atol=2e-5)
    np.testing.assert_allclose(state[0][1][0, 0, 0], final[-1], atol=2e-5)
    # the final state is the one the layer's dual form carries
    _, dual_state = jax.jit(ttt_dual)(params, *args)
    np.testing.assert_allclose(state[0][0], dual_state[0][0], atol=1e-5)
    np.testing.assert_allclose(got["before"][0, 0, :b], got["w0"][0, 0, :b], rtol=1e-6)


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint of an untrained tiny byte-level TTT-LM with bounded RoPE (no training)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model=model_config(ttt=dict(use_rope=True)),
                    data=DataConfig(source="bytes", seq_len=32, batch_size=2),
                    train=TrainConfig(steps=1, run_dir=str(run_dir)))
    return save_run(run_dir, cfg, host_params(TTT_LM, cfg.model, seed=1))


def test_cli_on_a_tiny_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "eval"
    # few shapes, few compilations: every forward pass is [2, 32] tokens
    rc = cli.main(["--checkpoint", str(tiny_run), "--lengths", "32,96", "--chunk", "32",
                   "--num-sequences", "2", "--ttt-diagnostics", "--diagnostics-length", "24",
                   "--recall", "--recall-distances", "4,30", "--recall-samples", "2",
                   "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "eval_context.json").read_text())
    (m,) = report["models"]
    assert m["architecture"] == "ttt_lm" and m["notes"] == []
    assert m["train_seq_len"] == 32 and m["model"]["rope_bounded"] is True
    assert set(m["lm"]) == {"32", "96"}
    long = m["lm"]["96"]
    assert [(b["start"], b["end"]) for b in long["buckets"]] == [(0, 64), (64, 96)]
    assert long["num_sequences"] == 2
    assert abs(long["bpb"] - long["loss"] / np.log(2)) < 1e-9
    # an untrained byte model: about log(256) nats everywhere
    assert all(abs(b["loss"] - np.log(256)) < 0.5 for b in long["buckets"])
    assert set(m["recall"]) == {"4", "30"}
    # Recall against the model's own argmax: the same planted-key sequences (the task's
    # generator, seed 0, drawn distance by distance) through one full forward here.
    from ttt_jax.checkpoint import load_run
    from ttt_jax.data import recall_sequence

    saved = load_run(tiny_run)
    forward = jax.jit(build_model(saved.config.model).apply)
    rng = np.random.default_rng(0)
    for dist in (4, 30):
        examples = [recall_sequence(rng, 32, dist, recall_vocab=64, vocab_size=VOCAB)
                    for _ in range(2)]
        tokens = np.stack([ex.tokens for ex in examples])
        logp = jax.nn.log_softmax(forward({"params": saved.params}, tokens[:, :-1]), axis=-1)
        q, values = examples[0].query_pos, np.array([ex.value for ex in examples])
        r = m["recall"][str(dist)]
        assert r["accuracy"] == np.mean(np.argmax(np.asarray(logp[:, q]), -1) == values)
        np.testing.assert_allclose(r["answer_loss"], -np.mean(np.asarray(logp[np.arange(2), q,
                                                                              values])),
                                   rtol=1e-5)
    assert [r["seq_len"] for r in m["recall"].values()] == [32, 32]  # the training length
    diag = m["ttt_diagnostics"]
    assert len(diag["layers"]) == 2 and diag["length"] == 24
    assert diag["bin_start"][0] == 0 and diag["bin_end"][-1] == 24
    assert all(len(layer[k]) == len(diag["bin_start"]) for layer in diag["layers"]
               for k in ("w0", "before", "after"))
    for name in ("loss_by_position.png", "recall.png", f"ttt_diagnostics_{m['label']}.png"):
        assert (out / name).stat().st_size > 1000
    assert "| 64-96 |" in (out / "eval_context.md").read_text()


def test_eval_context_module_is_an_alias_of_the_cli():
    from ttt_jax import eval_context

    assert eval_context.main is cli.main


def test_cli_errors_name_the_problem(tiny_run, tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path), "--lengths", "1x",
                     "--out", str(tmp_path)]) == 2
    assert "--lengths: entry '1x'" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tiny_run), "--num-sequences", "0",
                     "--out", str(tmp_path)]) == 2
    assert "num_sequences=0 (--num-sequences)" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tiny_run / "7"), "--out", str(tmp_path)]) == 2
    assert "no step 7" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Moshi-TTT

MOSHI_TINY = REPO / "ttt_jax" / "configs" / "moshi_ttt_tiny.yaml"
# The packaged tiny preset at smaller shapes (few, quick compilations): one layer with
# TTT-Linear grafted, attention context 8, its 4 streams (vocabs 32/16/16/16) of synthetic data.
MOSHI_SMALL = ["model.transformer.d_model=16", "model.transformer.num_heads=2",
               "model.transformer.num_layers=1", "model.transformer.dim_feedforward=64",
               "model.transformer.context=8", "model.ttt.layers=all",
               "model.ttt.layer_type=linear", "model.ttt.mini_batch_size=4",
               "data.seq_len=16", "data.batch_size=2"]


@pytest.fixture(scope="module")
def moshi_run(tmp_path_factory):
    """``(run_dir, cfg, params)``: a step-0 checkpoint of the tiny Moshi-TTT preset."""
    cfg = apply_overrides(load_config(MOSHI_TINY), MOSHI_SMALL)
    run_dir = tmp_path_factory.mktemp("moshi_run")
    params = host_params(registry.of(cfg), cfg.model, seed=2)
    return save_run(run_dir, cfg, params), cfg, params


def test_moshi_loss_by_position_matches_one_full_forward(moshi_run):
    from ttt_jax.moshi.data import make_frames_dataset
    from ttt_jax.moshi.hybrid import MoshiTTTLM

    run_dir, cfg, params = moshi_run
    assert registry.of(cfg).name == "moshi_ttt" and cfg.model.ttt_layers == (0,)
    # 96 frames streamed in chunks of 32 (12x the attention context, 6x the training length);
    # 32 frames in one pass; RUN_DIR/STEP names the checkpoint
    options = evals.EvalOptions(lengths=(32, 96), num_sequences=2, batch=2, chunk=32,
                                ttt_diagnostics=True, diagnostics_length=16,
                                diagnostics_sequences=2)
    result = evals.evaluate_checkpoint(run_dir / "0", options, log=lambda *a: None)
    assert result["architecture"] == "moshi_ttt" and result["step"] == 0
    assert result["model"]["num_streams"] == 4 and "recall" not in result

    # Independently: the run's validation frames, one full forward, each stream's
    # cross-entropy over its own vocab, averaged over streams and sequences per position.
    data = dataclasses.replace(cfg.data, seq_len=96, batch_size=2)
    frames = make_frames_dataset(data, cfg.model.vocab_sizes, seed=cfg.train.seed,
                                 split="val").batch(0)  # [2, 97, 4]
    logits = jax.jit(MoshiTTTLM(cfg.model).apply)({"params": params}, frames[:, :-1])
    ce = np.stack([optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :, k, :v], frames[:, 1:, k]) for k, v in enumerate(cfg.model.vocab_sizes)],
        axis=-1)  # [2, 96, 4]
    per_position = ce.mean(axis=(0, 2))
    for length, buckets in ((96, [(0, 64), (64, 96)]), (32, [(0, 32)])):
        got = result["lm"][str(length)]
        assert [(b["start"], b["end"]) for b in got["buckets"]] == buckets
        want = [per_position[s:e].mean() for s, e in buckets]
        np.testing.assert_allclose([b["loss"] for b in got["buckets"]], want, rtol=1e-5)
        np.testing.assert_allclose(got["loss"], per_position[:length].mean(), rtol=1e-5)
        assert "bpb" not in got  # synthetic streams are not bytes
    # the inner-loss diagnostics of the one grafted layer
    diag = result["ttt_diagnostics"]
    assert len(diag["layers"]) == 1 and diag["length"] == 16 and diag["mini_batch_size"] == 4
    (layer,) = diag["layers"]
    assert layer["before"][0] == pytest.approx(layer["w0"][0], rel=1e-5)  # first mini-batch
    assert np.all(np.isfinite([layer[k] for k in ("w0", "before", "after")]))
    text = evals.markdown_report({"models": [result]})
    assert "Moshi models: lengths and positions count frames" in text


def test_moshi_refuses_recall_and_unbounded_streaming(moshi_run, tmp_path, capsys):
    run_dir, cfg, params = moshi_run
    with pytest.raises(ValueError, match=r"recall=True \(--recall\) is invalid.*moshi_ttt"):
        evals.evaluate_checkpoint(run_dir, evals.EvalOptions(recall=True), log=print)
    assert cli.main(["--checkpoint", str(run_dir), "--recall", "--out", str(tmp_path)]) == 2
    assert "--recall" in capsys.readouterr().err
    unbounded = apply_overrides(cfg, ["model.transformer.context=null"]).model
    scorer = evals.Scorer(registry.of(cfg), unbounded, params, chunk=4)
    with pytest.raises(ValueError, match="--chunk=4 is invalid.*context is None"):
        scorer.score(np.zeros((1, 9, 4), np.int32))


def test_training_logs_inner_losses_every_n_steps(tmp_path):
    from ttt_jax.logging import MetricsWriter
    from ttt_jax.trainer import run

    cfg = RunConfig(model=model_config(), data=DataConfig(source="bytes", seq_len=8, batch_size=2),
                    train=TrainConfig(steps=2, eval_every=2, eval_batches=1, log_every=1,
                                      diagnostics_every=1, run_dir=str(tmp_path / "run")))
    run(cfg, print_fn=lambda *a, **k: None)
    records = MetricsWriter(tmp_path / "run" / "metrics.jsonl").read()
    diag = [r for r in records if r["kind"] == "ttt_diagnostics"]
    assert [r["step"] for r in diag] == [1, 2]
    assert all(len(r["layers"]) == 2 and set(r["layers"][0]) == {"w0", "before", "after"}
               for r in diag)
    with pytest.raises(ValueError, match="train.diagnostics_every"):
        TrainConfig(diagnostics_every=-1)
