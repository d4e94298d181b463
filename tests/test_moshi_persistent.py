"""Persistent TTT states on MoshiLM (``ttt.persistent_states``, docs/moshi.md).

A recording read as consecutive delayed windows with the carried state must give the logits of
one forward over the whole recording, and so the same loss, computed here independently in
numpy from that forward; a run resumed from a checkpoint must continue bit-identically, carried
state included; the data loader must read each recording's windows in order per batch row.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ttt_jax.cli.presets import load
from ttt_jax.moshi.config import MoshiDataConfig
from ttt_jax.moshi.data import (MOTIF_FRAMES, make_recording_windows, motif_recording)
from ttt_jax.moshi.lm import MoshiLM, delayed_recording
from ttt_jax.moshi.registration import MoshiLMObjective
from ttt_jax.run_dir import StopSignals
from ttt_jax.trainer import run

from conftest import compilation_cache

# A small MoshiLM with two TTT-MLP layers that are not no-ops, bounded RoPE in the TTT layers,
# an attention window (6 frames) shorter than a training window, and delays of 0..2 frames.
SMALL = ["model.transformer.d_model=32", "model.transformer.num_heads=2",
         "model.transformer.dim_feedforward=64", "model.transformer.context=6",
         "model.depformer.d_model=16", "model.depformer.dim_feedforward=[32]",
         "model.n_q=3", "model.dep_q=2", "model.delays=[0,0,1,2]", "model.card=11",
         "model.text_card=13", "model.ttt.layers=0,1", "model.ttt.layer_type=mlp",
         "model.ttt.mini_batch_size=4", "model.ttt.noop_init=false"]


@pytest.fixture(scope="module")
def small():
    cfg = load("moshi_lm_tiny", SMALL).model
    sample = jnp.zeros((1, 8, cfg.num_codebooks), jnp.int32)
    params = jax.jit(MoshiLMObjective(cfg).init)(jax.random.PRNGKey(1), sample)["params"]
    return cfg, params


def random_codes(cfg, batch, frames, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.integers(0, cfg.text_card, (batch, 1, frames))
    text[:, :, ::3] = cfg.existing_text_padding_id  # padding targets carry their own weight
    audio = rng.integers(0, cfg.card, (batch, cfg.n_q, frames))
    return np.concatenate([text, audio], axis=1).astype(np.int32)


def jitted(model, method=None):
    """``model.apply`` jitted (one compile per input shape) with the params first."""
    return jax.jit(lambda p, *args: model.apply({"params": p}, *args, method=method))


def windows_of(cfg, codes, length):
    """Delayed windows ``[B, K, length + 1]`` of whole recordings ``codes [B, K, N]``."""
    delayed = np.stack([delayed_recording(c, cfg.delays, cfg.initial_ids) for c in codes])
    n = codes.shape[2] // length
    return [delayed[:, :, c * length:c * length + length + 1] for c in range(n)]


def test_delayed_recording_by_hand():
    codes = np.arange(1, 9).reshape(2, 4)  # stream 0 delay 0, stream 1 delay 2
    assert delayed_recording(codes, (0, 2), (90, 91)).tolist() == [
        [90, 1, 2, 3, 4], [91, 91, 91, 5, 6]]
    assert delayed_recording(codes, (0, 2), (90, 91), 2, 2).tolist() == [[2, 3], [91, 5]]


def test_windows_with_the_carried_state_equal_one_forward(small):
    cfg, params = small
    codes = random_codes(cfg, 2, 36)
    model = MoshiLM(cfg)
    full = jitted(model)(params, jnp.asarray(codes))
    step = jitted(model, "stream_window")
    fresh = model.apply({"params": params}, 2, method="init_carry")
    carry = fresh
    text, audio, fresh_text = [], [], []
    for w in windows_of(cfg, codes, 12):
        t, a, carry = step(params, jnp.asarray(w), carry)
        text.append(np.asarray(t))
        audio.append(np.asarray(a))
        fresh_text.append(np.asarray(step(params, jnp.asarray(w), fresh)[0]))
    text, audio = np.concatenate(text, axis=2), np.concatenate(audio, axis=2)
    # Delayed position j of stream k is the full forward's (undelayed) position j - delays[k].
    n = codes.shape[2]
    for k in range(1 + cfg.dep_q):
        d = cfg.delays[k]
        ours = (text[:, 0] if k == 0 else audio[:, k - 1])[:, d:]
        ref = np.asarray(full.text_logits[:, 0] if k == 0 else full.logits[:, k - 1])[:, :n - d]
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    # Without the carried state the later windows are different predictions.
    later = np.concatenate(fresh_text[1:], axis=2)[:, 0]
    assert np.abs(later - np.asarray(full.text_logits[:, 0, 12:])).max() > 1e-3


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_window_loss(cfg, full, codes, start, length):
    """The Moshi loss of the predictions whose delayed positions are ``[start, start+length)``,
    from the full forward, in numpy (text padding weighted, invalid positions left out)."""
    n = codes.shape[2]
    sums = {"text": [0.0, 0.0], "audio": [0.0, 0.0]}
    pads = {cfg.existing_text_padding_id, cfg.existing_text_end_padding_id}
    for k in range(1 + cfg.dep_q):
        logits = np.asarray(full.text_logits[:, 0] if k == 0 else full.logits[:, k - 1],
                            np.float64)
        for b in range(codes.shape[0]):
            for j in range(start, start + length):
                t = j - cfg.delays[k]
                if t < 0 or t >= n:
                    continue
                target = codes[b, k, t]
                ce = -log_softmax(logits[b, t])[target]
                w = (cfg.text_padding_weight if target in pads else 1.0) if k == 0 else (
                    cfg.first_codebook_weight_multiplier if k == 1 else 1.0)
                which = "text" if k == 0 else "audio"
                sums[which][0] += w * ce
                sums[which][1] += w
    return sum(s / w for s, w in sums.values())


def test_persistent_loss_equals_the_loss_of_one_forward(small):
    cfg, params = small
    codes = random_codes(cfg, 2, 24, seed=3)
    full = jitted(MoshiLM(cfg))(params, jnp.asarray(codes))
    model = MoshiLMObjective(cfg)
    carry = model.apply({"params": params}, 2, method="init_carry")
    step = jitted(model, "loss_sums_carry")
    for c, w in enumerate(windows_of(cfg, codes, 8)):
        (loss, count), carry = step(params, jnp.swapaxes(jnp.asarray(w), 1, 2), None, carry)
        assert float(count) == 1.0
        np.testing.assert_allclose(float(loss), reference_window_loss(cfg, full, codes, 8 * c, 8),
                                   rtol=2e-5)


def test_recording_windows_read_each_recording_in_order(tmp_path):
    lengths = [40, 25, 64, 33, 10]  # the 10-frame recording has no 12-frame window
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        np.save(tmp_path / f"{i}.npy", np.stack([rng.integers(0, 9, n), rng.integers(0, 5, n)]))
    data = MoshiDataConfig(source="codebooks", path=str(tmp_path), seq_len=12, batch_size=2,
                           val_fraction=0.1)
    ds = make_recording_windows(data, (9, 5), seed=0, split="train", delays=(0, 1),
                                initial=(9, 5))
    # Train parts (the last max(13, 10%) frames are val): 27, 12, 51, 20 frames.
    assert len(ds.arrays) == 4 and ds.counts.tolist() == [2, 1, 4, 1]
    again = make_recording_windows(data, (9, 5), seed=0, split="train", delays=(0, 1),
                                   initial=(9, 5))
    batches = [ds.batch(s) for s in range(14)]
    assert np.array_equal(again.batch(9), batches[9])  # a pure function of the step
    for row in range(2):
        seen, expected = [], []
        for step in range(14):
            rec, c = ds.locate(row, step)
            window = batches[step][row].T
            whole = delayed_recording(ds.arrays[rec], (0, 1), (9, 5))
            assert np.array_equal(window, whole[:, 12 * c:12 * c + 13])
            assert (c == 0) == bool(np.all(window[:, 0] == (9, 5)))  # only a start is initial
            seen.append((rec, c))
        # Row r reads its recordings window after window, each from its first window.
        for (rec, c), (rec2, c2) in zip(seen, seen[1:]):
            assert (rec2, c2) == (rec, c + 1) or (c2 == 0 and c + 1 == ds.counts[rec])
    epoch0 = {ds.locate(r, 0)[0] for r in range(2)}
    assert len(epoch0) == 2  # the rows read different recordings
    with pytest.raises(ValueError, match=r"at least data.batch_size=5 recordings"):
        make_recording_windows(MoshiDataConfig(source="codebooks", path=str(tmp_path),
                                               seq_len=12, batch_size=5, val_fraction=0.1),
                               (9, 5), seed=0, split="train", delays=(0, 1), initial=(9, 5))


def test_motif_recordings_repeat_their_motifs():
    rec = motif_recording((7, 5, 5), 200, seed=0, split="train", index=3)
    assert rec.shape == (3, 200) and rec.dtype == np.int32
    assert np.array_equal(rec, motif_recording((7, 5, 5), 200, seed=0, split="train", index=3))
    assert not np.array_equal(rec, motif_recording((7, 5, 5), 200, seed=0, split="val",
                                                   index=3))
    segments = [rec[:, s:s + MOTIF_FRAMES].tobytes() for s in range(0, 200 - 7, MOTIF_FRAMES)]
    repeated = len(segments) - len(set(segments))
    assert repeated >= 8  # about half the 25 segments are one of four motifs
    assert rec[0].max() < 7 and rec[1:].max() < 5


def test_persistent_states_config_errors():
    with pytest.raises(ValueError, match=r"data.source='synthetic' is invalid: expected "
                                         r"'codebooks' or 'motifs'"):
        load("moshi_lm_tiny", ["model.ttt.persistent_states=true"])
    with pytest.raises(ValueError, match=r"model.delays=\(1, 1, .*a stream with delay 0"):
        load("moshi_lm_tiny", ["model.ttt.persistent_states=true", "data.source=motifs",
                               "model.delays=[1,1,1,1,1,1,1,1,1]"])
    with pytest.raises(ValueError, match=r"ttt.persistent_states=True is invalid: expected "
                                         r"false for architecture moshi_ttt"):
        load("moshi_ttt_tiny", ["model.ttt.persistent_states=true"])


# Constant learning rate (no warmup, no decay): a run stopped early and resumed takes the
# same updates as one straight run. Four windows per recording, so step 2 continues step 1's.
RUN = SMALL + ["model.ttt.persistent_states=true", "data.source=motifs", "data.recordings=4",
               "data.recording_frames=48", "data.seq_len=12", "data.batch_size=2",
               "train.grad_accum=2", "train.eval_every=100", "train.eval_batches=1",
               "train.log_every=1", "checkpoint.every=1", "train.trackers=[jsonl]",
               "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]


class StopAfterFirstStep(StopSignals):
    """A SIGTERM as the loop starts: the run trains one step, saves it and stops (preemption)."""

    def training(self):
        super().training()
        self.signal = signal.SIGTERM


def train(run_dir, steps, stop=None):
    cfg = load("moshi_lm_tiny", RUN + [f"train.steps={steps}", f"train.run_dir={run_dir}"])
    return run(cfg, print_fn=lambda *a, **k: None, stop=stop)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 2-step run, and the same stopped after step 1 and resumed; the number of
    programs in the compilation cache after each."""
    tmp = tmp_path_factory.mktemp("persistent")
    cache = tmp / "jax_cache"
    with compilation_cache(cache):
        straight = train(tmp / "straight", 2)["state"]
        stopped = train(tmp / "split", 2, stop=StopAfterFirstStep())
        assert stopped["stopped"] and int(stopped["state"].step) == 1
        programs = len(list(cache.iterdir()))
        resumed = train(tmp / "split", 2)["state"]
        assert int(resumed.step) == 2
    return tmp, straight, resumed, (programs, len(list(cache.iterdir())))


def test_a_resumed_persistent_run_is_bit_identical(runs):
    _, straight, resumed, _ = runs
    assert straight.carry is not None and jax.tree.leaves(straight.carry)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_resumed_run_compiles_nothing_new(runs):
    # The restored state reaches jit committed to the device, as a fresh one does: the resumed
    # run's train and eval steps are the cached programs of the first run.
    _, _, _, (before, after) = runs
    assert before > 0 and after == before


def test_resuming_with_another_batch_size_names_the_carried_state(runs, tmp_path):
    import shutil

    from ttt_jax.checkpoint import CheckpointError

    tmp, *_ = runs
    shutil.copytree(tmp / "straight", tmp_path / "run")
    cfg = load("moshi_lm_tiny", RUN + ["train.steps=3", "data.batch_size=4",
                                       f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(CheckpointError, match=r"(?s)carry/layers/0/attn/pos: checkpoint int32"
                                              r"\[2, 6\] vs model int32\[4, 6\].*one row per "
                                              r"data.batch_size"):
        run(cfg, print_fn=lambda *a, **k: None)


def reference_stream_losses(cfg, params, tokens):
    """Per-stream cross-entropy ``[B, L, S]`` of frames ``tokens [B, L + 1, K]`` from one
    forward over them, in numpy; NaN where the forward has no prediction."""
    out = jitted(MoshiLM(cfg))(params, jnp.asarray(np.swapaxes(tokens, 1, 2)))
    length = tokens.shape[1] - 1
    logits = [np.asarray(out.text_logits[:, 0], np.float64)] + [
        np.asarray(out.logits[:, q], np.float64) for q in range(cfg.dep_q)]
    mask = np.concatenate([np.asarray(out.text_mask), np.asarray(out.mask)], axis=1)
    ref = np.full((tokens.shape[0], length, len(logits)), np.nan)
    for b in range(tokens.shape[0]):
        for k, stream in enumerate(logits):
            for t in range(length):
                if mask[b, k, t]:
                    ref[b, t, k] = -log_softmax(stream[b, t])[tokens[b, t, k]]
    return ref


@pytest.mark.parametrize("chunk", [7, 0])
def test_eval_scores_a_recording_per_stream_exactly(small, chunk):
    from ttt_jax import registry
    from ttt_jax.evals import Scorer

    cfg, params = small
    tokens = np.swapaxes(random_codes(cfg, 2, 23, seed=5), 1, 2)  # [B, L + 1, K]
    loss, pred = Scorer(registry.get("moshi_lm"), cfg, params, chunk).score(tokens)
    assert loss.shape == pred.shape == (2, 22, 1 + cfg.dep_q)
    ref = reference_stream_losses(cfg, params, tokens)
    assert np.array_equal(np.isnan(loss), np.isnan(ref))
    assert not np.isnan(ref).any()  # delays <= 1 on the predicted streams: all L predicted
    np.testing.assert_allclose(loss, ref, atol=1e-4)


def test_eval_of_a_moshi_lm_run_reports_each_stream(runs):
    from ttt_jax.evals import EvalOptions, evaluate_checkpoint, markdown_report

    tmp, *_ = runs
    options = EvalOptions(lengths=(16, 40), num_sequences=2, chunk=12)
    result = evaluate_checkpoint(tmp / "straight", options, log=lambda *a: None)
    row = result["lm"]["40"]
    assert set(row["streams"]) == {"text", "audio0", "audio1"}
    assert result["model"]["persistent_states"] is True
    frame = np.mean([row["streams"][s]["loss"] for s in row["streams"]])
    assert abs(frame - row["loss"]) < 0.05  # the frame loss averages the streams
    report = markdown_report({"models": [result]})
    assert "| straight | audio1 |" in report
