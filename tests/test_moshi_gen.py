"""Streaming generation (``ttt_jax.moshi.gen.MoshiGen``) against the real ``moshi`` package's
``LMGen`` (moshi==0.2.13, torch CPU), and ``ttt-jax generate`` on a Moshi run.

A small random-weight ``LMModel`` (2 user audio streams, delays up to 2 frames, a KV window of
6 frames that wraps) is imported into ours with TTT grafted as a no-op; fed the same user audio
codes (a few of them the zero token -1), greedy ``MoshiGen.step`` gives ``LMGen.step``'s tokens
at every one of 41 steps, None at the same steps. Sampling is checked against a numpy
softmax / top-k, and top-k 1 against greedy.
"""

from __future__ import annotations

import dataclasses
import math
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lm_module = pytest.importorskip("moshi.models.lm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import save_untrained_run  # noqa: E402
from test_moshi_lm import build_ref, random_target  # noqa: E402

from ttt_jax.moshi.config import TTTArgs  # noqa: E402
from ttt_jax.moshi.gen import MoshiGen, sample_token  # noqa: E402
from ttt_jax.moshi.lm import MoshiLM  # noqa: E402
from ttt_jax.moshi.lm_config import from_moshi_lm_kwargs  # noqa: E402
from ttt_jax.moshi.lm_convert import from_lm_state_dict  # noqa: E402

# Streams: text, 2 generated audio codebooks, 2 user codebooks (delays 0 0 2 | 1 0); Mimi's
# 2048 codes, so that the same model answers a wav encoded through Mimi.
KW = dict(card=2048, text_card=13, dim=32, num_heads=4, num_layers=2, hidden_scale=4, context=6,
          causal=True, gating="silu", positional_embedding="rope", max_period=10000,
          depformer_dim=16, depformer_num_heads=2, delays=[0, 0, 2, 1, 0], n_q=4, dep_q=2,
          norm="rms_norm_f32", layer_scale=None, depformer_num_layers=2,
          depformer_multi_linear=True, depformer_weights_per_step=True,
          depformer_pos_emb="sin", depformer_dim_feedforward=48)
TTT = TTTArgs(enable=True, layers="1", mini_batch_size=4, use_rope=True, noop_init=True,
              layer_type="linear")
BATCH, FRAMES = 2, 40
MAX_DELAY = max(KW["delays"])


def feeding(user):
    """The user frame of every step, as ``MoshiGen.generate`` feeds them: frame 0 at steps 0
    and 1, frame ``t`` at step ``t + 1``, then ``max_delay - 1`` steps of -1 (no input)."""
    b, k, length = user.shape
    return ([user[:, :, 0]] + [user[:, :, t] for t in range(length)]
            + [np.full((b, k), -1, user.dtype)] * (MAX_DELAY - 1))


def lmgen_steps(ref, steps, **kw):
    """``LMGen.step`` of every step's user frame: ``[B, dep_q + 1]`` numpy or None each."""
    gen = lm_module.LMGen(ref, **kw)
    out = []
    with gen.streaming(steps[0].shape[0]), torch.no_grad():
        for frame in steps:
            tokens = gen.step(torch.from_numpy(frame.astype(np.int64))[:, :, None])
            out.append(None if tokens is None else tokens[:, :, 0].numpy())
    return out


def import_lm(kw, seed=0):
    """An ``LMModel`` of ``kw`` with random weights, and ours: ``(ref, cfg, params)``."""
    ref = build_ref(kw, seed)
    cfg = from_moshi_lm_kwargs(kw, ttt=TTT)
    codes = np.zeros((1, cfg.num_codebooks, 4), np.int64)
    params, kept = from_lm_state_dict(cfg, ref.state_dict(), random_target(cfg, codes, seed=1),
                                      require_ttt=False)
    assert kept and all("seq_modeling_block" in k for k in kept)  # the no-op graft
    return ref, cfg, params


@pytest.fixture(scope="module")
def case():
    ref, cfg, params = import_lm(KW)
    rng = np.random.default_rng(0)
    user = rng.integers(0, KW["card"], (BATCH, 2, FRAMES))
    user[0, 1, 5] = user[1, 0, 17] = user[0, 0, 30] = -1  # no input in a few places
    steps = feeding(user)
    want = lmgen_steps(ref, steps, use_sampling=False)
    frames = np.stack([w for w in want if w is not None], axis=2)  # [B, dep_q + 1, T]
    return SimpleNamespace(ref=ref, cfg=cfg, params=params, user=user, steps=steps, want=want,
                           frames=frames)


@pytest.fixture(scope="module")
def greedy(case):
    """Greedy ``MoshiGen.step`` over the same steps (one jit), the state kept after step 5."""
    gen = MoshiGen(case.cfg, case.params, use_sampling=False, batch=BATCH)
    out, early = [], None
    for i, frame in enumerate(case.steps):
        tokens = gen.step(frame)
        out.append(None if tokens is None else np.asarray(tokens))
        if i == 4:
            early = jax.tree.map(np.asarray, gen.state)
    return SimpleNamespace(gen=gen, out=out, early=early,
                           late=jax.tree.map(np.asarray, gen.state))


def test_greedy_steps_equal_lmgen(case, greedy):
    assert len(case.want) == FRAMES + MAX_DELAY
    assert [w is None for w in case.want] == [True] * MAX_DELAY + [False] * FRAMES
    for i, (got, want) in enumerate(zip(greedy.out, case.want)):
        if want is None:
            assert got is None, i
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"step {i}")
    # The comparison can fail: every stream varies, and the user's codes are read.
    for k in range(3):
        assert len(np.unique(case.frames[:, k])) > 2, k
    other = greedy.gen.generate(np.roll(case.user, 3, axis=2))
    assert not np.array_equal(other, case.frames)


def test_generate_lays_frames_out_as_the_training_codes(case, greedy):
    """``generate`` is the steps' frames; stacked with the user's codes they are codes whose
    greedy teacher-forced predictions (the full forward) are the generated tokens."""
    got = greedy.gen.generate(case.user)
    assert got.shape == (BATCH, 3, FRAMES) and got.dtype == np.int32
    np.testing.assert_array_equal(got, case.frames)
    codes = jnp.asarray(np.concatenate([got, case.user], axis=1))
    out = jax.jit(MoshiLM(case.cfg).apply)({"params": case.params}, codes)
    for logits, mask, tokens in ((out.text_logits, out.text_mask, got[:, :1]),
                                 (out.logits, out.mask, got[:, 1:])):
        mask = np.asarray(mask)
        assert mask.sum() >= mask.size - BATCH * MAX_DELAY  # all but the last frames
        pred = np.asarray(jnp.argmax(jnp.nan_to_num(logits, nan=-1e30), axis=-1))
        np.testing.assert_array_equal(np.where(mask, pred, -9), np.where(mask, tokens, -9))


def test_state_has_constant_size(greedy):
    shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), s) for s in (greedy.early,
                                                                         greedy.late)]
    assert jax.tree.structure(greedy.early) == jax.tree.structure(greedy.late)
    assert shapes[0] == shapes[1]
    assert int(greedy.early.offset) == 5 and int(greedy.late.offset) == FRAMES + MAX_DELAY
    layer = [c for c in greedy.late.cache["layers"] if "ttt" in c]
    assert len(layer) == 1 and greedy.late.cache["layers"][0]["attn"]["k"].shape[2] == 6
    old = [c for c in greedy.early.cache["layers"] if "ttt" in c][0]
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), old["ttt"], layer[0]["ttt"])
    assert any(jax.tree.leaves(moved))  # the TTT state is carried (and moves)


def np_top_k_probs(logits, temp, top_k):
    """The distribution of one draw: numpy softmax at ``temp``, renormalised over the
    ``top_k`` most likely (0: all)."""
    z = logits.astype(np.float64) / temp
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_k:
        keep = np.argsort(-p)[:top_k]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return p


def test_sample_token_draws_the_numpy_distribution():
    """40000 draws of one jitted sampler (temperature and top-k traced) per setting: the
    frequencies are numpy's softmax at that temperature over the top k, none outside it."""
    logits = np.random.default_rng(1).standard_normal(11).astype(np.float32) * 2
    draws = 40000
    keys = jax.random.split(jax.random.PRNGKey(2), draws)
    sample = jax.jit(jax.vmap(sample_token, in_axes=(None, 0, None, None, None)))
    for temp, top_k in ((0.7, 4), (1.5, 0), (1.0, 25), (2.0, 1)):
        tokens = np.asarray(sample(jnp.asarray(logits), keys, True, temp, top_k))
        freq = np.bincount(tokens, minlength=11) / draws
        want = np_top_k_probs(logits, temp, top_k)
        assert np.all(freq[want == 0] == 0), (temp, top_k)  # never outside the top k
        assert np.abs(freq - want).max() < 4 * np.sqrt(0.25 / draws), (temp, top_k, freq, want)
    greedy = np.asarray(sample(jnp.asarray(logits), keys[:4], False, 0.7, 4))
    assert np.all(greedy == np.argmax(logits))
    assert np.all(np.asarray(sample(jnp.asarray(logits), keys[:4], True, 0.0, 4)) == greedy)


def test_top_k_one_sampling_is_greedy(case):
    gen = MoshiGen(case.cfg, case.params, temp=1.7, temp_text=1.3, top_k=1, top_k_text=1,
                   batch=BATCH)
    np.testing.assert_array_equal(gen.generate(case.user, jax.random.PRNGKey(5)), case.frames)


def test_sampling_follows_the_key(case):
    gen = MoshiGen(case.cfg, case.params, batch=BATCH)  # LMGen's defaults
    assert gen.sampling == (True, 0.8, 0.7, 250, 25)
    a = gen.generate(case.user, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(gen.generate(case.user, jax.random.PRNGKey(0)), a)
    b = gen.generate(case.user, jax.random.PRNGKey(1))
    assert (a != b).mean() > 0.2 and (a != case.frames).mean() > 0.2
    assert a[:, 0].max() < KW["text_card"] and a[:, 1:].max() < KW["card"] and a.min() >= 0


def test_refusals_name_the_argument(case):
    with pytest.raises(ValueError, match="cfg_coef=2.0 is not supported"):
        MoshiGen(case.cfg, case.params, cfg_coef=2.0)
    with pytest.raises(ValueError, match="top_k=-1 is invalid"):
        MoshiGen(case.cfg, case.params, top_k=-1)
    gen = MoshiGen(case.cfg, case.params, use_sampling=False, batch=BATCH)
    with pytest.raises(ValueError, match=r"user_audio_codes .* \[2, 2\], got int64\[2, 3\]"):
        gen.step(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"user_codes\[1, 0, 2\] = 2048 is out of range"):
        bad = case.user.copy()
        bad[1, 0, 2] = 2048
        gen.generate(bad)
    with pytest.raises(ValueError, match="key is required"):
        MoshiGen(case.cfg, case.params, batch=BATCH).step(case.steps[0])


# ---- ttt-jax generate on a moshi_lm run ---------------------------------------------------


def save_run(cfg, params, run_dir):
    """A step-0 checkpoint of a ``moshi_lm`` run holding ``params`` (no training)."""
    from ttt_jax.moshi.lm_config import MoshiLMRunConfig

    return save_untrained_run(run_dir, MoshiLMRunConfig(model=cfg), params)


@pytest.fixture(scope="module")
def moshi_run(case, tmp_path_factory):
    return save_run(case.cfg, case.params, tmp_path_factory.mktemp("gen") / "run")


def cli(*argv):
    from ttt_jax.cli import main

    return main(["generate", *map(str, argv)])


def test_cli_input_codes_is_lmgen(case, moshi_run, tmp_path, capsys):
    """Greedy ``ttt-jax generate --input-codes`` (the user rows alone, or a whole codes array
    whose user rows are used) writes LMGen's tokens."""
    greedy = ("--temperature", 0, "--temperature-text", 0)
    np.save(tmp_path / "user.npy", case.user[0].astype(np.int16))
    assert cli("--checkpoint", moshi_run, "--input-codes", tmp_path / "user.npy", "--out",
               tmp_path / "a.npy", *greedy) == 0
    got = np.load(tmp_path / "a.npy")
    assert got.shape == (3, FRAMES)
    np.testing.assert_array_equal(got, case.frames[0])
    whole = np.concatenate([np.full((3, FRAMES), 7), case.user[0]])  # [K, T], text first
    np.save(tmp_path / "whole.npy", whole)
    assert cli("--checkpoint", moshi_run, "--input-codes", tmp_path / "whole.npy", "--out",
               tmp_path / "b.npy", *greedy) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), case.frames[0])
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--input-codes", "NOPE"], "--input-codes .*nope.npy' does not exist"),
    (["--input-codes", "BAD"], r"--input-codes .* holds int64\[3, 5\]: expected integer codes "
                               r"\[n_q - dep_q = 2, T\] .* or \[n_q \+ 1 = 5, T\]"),
    (["--input-codes", "RANGE"], r"user row 1, frame 2 holds 2048: expected audio ids in "
                                 r"\[0, model.card = 2048\)"),
    ([], "needs exactly one of --input-codes"),
    (["--input-codes", "GOOD", "--prompt", "x"], "--prompt is for text runs"),
    (["--input-wav", "NOPE"], "--input-wav .*nope.npy' does not exist"),
    (["--input-wav", "WAV"], "--input-wav needs Mimi"),
    (["--input-codes", "GOOD", "--top-k", "-2"], "--top-k -2: expected an int >= 0"),
])
def test_cli_errors_name_the_flag(moshi_run, tmp_path, capsys, argv, match):
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.int64))
    rng = np.zeros((2, 5), np.int64)
    rng[1, 2] = 2048
    np.save(tmp_path / "range.npy", rng)
    np.save(tmp_path / "good.npy", np.zeros((2, 5), np.int64))
    (tmp_path / "a.wav").write_bytes(b"")
    names = {"NOPE": "nope.npy", "BAD": "bad.npy", "RANGE": "range.npy", "GOOD": "good.npy",
             "WAV": "a.wav"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    out = tmp_path / "out.npy"
    assert cli("--checkpoint", moshi_run, *argv, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.rstrip("\n").count("\n") <= 1, err
    import re

    assert re.search(match, err), err
    assert not out.exists()


def zeros_run(cfg, run_dir):
    """A step-0 checkpoint of run config ``cfg`` with all-zero params (nothing compiled)."""
    from ttt_jax import registry

    shapes = registry.of(cfg).param_shapes(cfg.model)
    return save_untrained_run(run_dir, cfg,
                              jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes))


def test_cli_refuses_what_the_run_cannot_take(case, tmp_path, capsys):
    """Moshi flags on a text run; Mimi on a Moshi run whose audio tokens are not Mimi's."""
    from ttt_jax import ModelConfig, RunConfig, TTTConfig
    from ttt_jax.moshi.lm_config import MoshiLMRunConfig

    model = ModelConfig(vocab_size=256, num_layers=1, intermediate_size=16,
                        ttt=TTTConfig(model_dim=8, num_heads=2, mini_batch_size=4))
    text_run = zeros_run(RunConfig(model=model), tmp_path / "text")
    (tmp_path / "a.wav").write_bytes(b"")
    assert cli("--checkpoint", text_run, "--input-wav", tmp_path / "a.wav") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input-wav is for architecture moshi_lm runs: --checkpoint "
                          "holds a run of architecture 'ttt_lm'"), err
    assert cli("--checkpoint", text_run) == 2
    assert "--prompt is required" in capsys.readouterr().err
    small = dataclasses.replace(case.cfg, card=11)
    small_run = zeros_run(MoshiLMRunConfig(model=small), tmp_path / "small")
    np.save(tmp_path / "user.npy", np.zeros((2, 3), np.int64))
    assert cli("--checkpoint", small_run, "--input-codes", tmp_path / "user.npy",
               "--mimi-random-init", 0, "--out", tmp_path / "o.npy") == 2
    err = capsys.readouterr().err
    assert err == ("error: --mimi-random-init: Mimi's codebooks have 2048 entries but the run's "
                   "model.card = 11: the run's audio tokens are not Mimi codes (drop the Mimi "
                   "flag and use --input-codes)\n"), err


def test_cli_input_wav_through_random_mimi(moshi_run, tmp_path, capsys):
    """``--input-wav`` with ``--mimi-random-init``: the wav's Mimi frames in, the codes of as
    many frames out and their audio decoded, the random weights announced on stderr."""
    pytest.importorskip("soundfile")
    samples = int(24000 * 0.5)
    t = np.arange(samples) / 24000
    pcm = (0.5 * np.sin(2 * np.pi * (100 + 400 * t) * t) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "in.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm.tobytes())
    assert cli("--checkpoint", moshi_run, "--input-wav", tmp_path / "in.wav",
               "--mimi-random-init", 0, "--out", tmp_path / "out" / "gen.npy", "--seed", 1) == 0
    captured = capsys.readouterr()
    assert "Mimi has RANDOM weights" in captured.err and "gen.wav" in captured.out
    frames = math.ceil(samples / 1920)
    codes = np.load(tmp_path / "out" / "gen.npy")
    assert codes.shape == (3, frames) and codes.min() >= 0 and codes[1:].max() < 2048
    with wave.open(str(tmp_path / "out" / "gen.wav")) as w:
        assert w.getframerate() == 24000 and w.getnframes() == frames * 1920
