"""Streaming decode: prefill/step/chunks reproduce the full-sequence forward exactly.

The reference is ``TTTLM.__call__`` on the whole sequence (the dual form scanned from the
start, itself checked against the numpy primal form in ``test_ttt_correctness.py``). The decode
path is independent: chunks laid out in per-element mini-batch frames with accumulated
gradients, and single tokens through the per-token primal form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax import ModelConfig, TTTConfig
from ttt_jax.decode import Decoder, GREEDY, Sampling
from ttt_jax.models.ttt_lm import TTTLM
from ttt_jax.types import SequenceMetadata

B, V, b = 2, 32, 4
L = 4 * b + 5  # 21: four whole mini-batches and a partial one
TOL = 1e-5

# Every value of every switch appears in at least one variant (one block each; the shared
# ``everything`` setup below has two, so per-layer states are checked too).
VARIANTS = {
    "linear": dict(ttt_layer_type="linear"),
    "mlp": dict(ttt_layer_type="mlp"),
    "linear-preconv-rope": dict(ttt_layer_type="linear", use_rope=True, pre_conv=True),
    "mlp-shareqk-gate-half-l2": dict(ttt_layer_type="mlp", share_qk=True, use_gate=True,
                                     use_rope=True, rope_layout="half", qk_l2_norm=True),
    "linear-all": dict(ttt_layer_type="linear", share_qk=True, use_gate=True, pre_conv=True,
                       use_rope=True, rope_layout="half", qk_l2_norm=True),
    "mlp-preconv-rope-l2": dict(ttt_layer_type="mlp", pre_conv=True, use_rope=True,
                                qk_l2_norm=True),
}


def make_config(pre_conv=False, num_layers=1, **ttt):
    # A large init range and base lr so the inner updates move the outputs noticeably.
    ttt = TTTConfig(model_dim=16, num_heads=2, mini_batch_size=b, initializer_range=0.2,
                    ttt_base_lr=1.0, **ttt)
    return ModelConfig(vocab_size=V, num_layers=num_layers, intermediate_size=32, ttt=ttt,
                       pre_conv=pre_conv)


class Setup:
    """A config, random params, a decoder and a jitted full forward."""

    def __init__(self, cfg, seed=0):
        self.cfg = cfg
        self.model = TTTLM(cfg)
        init = jax.jit(lambda key: self.model.init(key, jnp.zeros((1, b), jnp.int32)))
        self.params = init(jax.random.PRNGKey(seed))["params"]
        self.dec = Decoder(cfg)
        self._full = jax.jit(lambda p, t, off: self.model.apply(
            {"params": p}, t, SequenceMetadata(offset=off)))

    def full(self, tokens, offset=0):
        return self._full(self.params, jnp.asarray(tokens), jnp.asarray(offset, jnp.int32))


def tokens_of(seed, shape):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), shape, 0, V), np.int32)


def stream_steps(setup, state, toks):
    """Feeds ``toks [B, n]`` one token at a time; returns logits ``[B, n, V]`` and the state."""
    outs = []
    for t in range(toks.shape[1]):
        logits, state = setup.dec.step(setup.params, state, toks[:, t])
        outs.append(logits)
    return jnp.stack(outs, axis=1), state


def max_err(a, b_):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b_))))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return Setup(make_config(**VARIANTS[request.param]))


def test_prefill_then_steps_equals_full_forward(variant):
    """``prefill(k)`` then ``L - k`` steps equals the full forward at every position, for
    k in {0, 1, b-1, b, 2b+3}. One batch holds every k (element ``(k, e)`` is fed the first k
    tokens of sequence e, the rest of its prefill chunk is padding), so each variant compiles
    one prefill and one step; that padding is ignored is checked on its own below."""
    ks = (0, 1, b - 1, b, 2 * b + 3)
    toks = tokens_of(1, (B, 2 * L))  # steps past L feed extra tokens; only [0, L) is compared
    full = variant.full(toks[:, :L])
    tiled = np.tile(toks, (len(ks), 1))  # [len(ks) * B, 2L]: row k_i * B + e is sequence e
    lengths = np.repeat(ks, B)
    head, state = variant.dec.prefill(variant.params, tiled[:, :L], lengths=lengths)
    rows = np.arange(len(tiled))
    stepped = []
    for s in range(L):
        logits, state = variant.dec.step(variant.params, state, tiled[rows, lengths + s])
        stepped.append(logits)
    stepped = jnp.stack(stepped, axis=1)  # [rows, L, V]: row r holds positions lengths[r] + s
    for i, k in enumerate(ks):
        for e in range(B):
            r = i * B + e
            got = jnp.concatenate([head[r, :k], stepped[r, :L - k]], axis=0)
            assert got.shape == (L, V)
            assert max_err(got, full[e]) <= TOL, f"prefill({k}) + steps, sequence {e}"
    logits, _ = variant.dec.prefill(variant.params, toks[:, :L])  # prefill(L), no lengths
    assert max_err(logits, full) <= TOL


def test_the_stream_state_matters():
    """The reference is sensitive to what the state carries: restarting it changes logits."""
    s = Setup(make_config(**VARIANTS["mlp"]))
    toks = tokens_of(2, (B, L))
    full = s.full(toks)
    restarted = s.full(toks[:, 2 * b:])  # same tokens, fresh state at a mini-batch boundary
    assert max_err(restarted, full[:, 2 * b:]) > 1e-3


@pytest.fixture(scope="module")
def everything():
    return Setup(make_config(num_layers=2, **VARIANTS["linear-all"]), seed=3)


def test_chunks_of_any_size_after_a_prefill_that_ended_mid_minibatch(everything):
    """A prefill that ends inside a mini-batch, then chunks of sizes 2, 5, 1, 7, b, 9, 1 and a
    final 11 (every phase; shorter and longer than b). The chunks of at most 9 tokens go
    through one 9-wide prefill with ``lengths`` (padding is ignored: checked below)."""
    s = everything
    toks = tokens_of(4, (B, 43))
    full = s.full(toks)
    logits, state = s.dec.prefill(s.params, toks[:, :3])
    outs, at = [logits], 3
    for size in (2, 5, 1, 7, b, 9, 1):
        if size == 1:
            chunk, state = s.dec.step(s.params, state, toks[:, at])
            chunk = chunk[:, None]
        else:
            window = np.zeros((B, 9), np.int32)
            window[:, :size] = toks[:, at:at + size]
            chunk, state = s.dec.prefill(s.params, window, state, lengths=[size] * B)
            chunk = chunk[:, :size]
        outs.append(chunk)
        at += size
    rest, _ = s.dec.prefill(s.params, toks[:, at:], state)
    assert rest.shape[1] == 11
    outs.append(rest)
    assert max_err(jnp.concatenate(outs, axis=1), full) <= TOL


def test_batch_elements_are_independent_streams(everything):
    """Prompts of different lengths (right padded) in one batch, then steps: each element
    equals its own single-stream forward, and nothing leaks between elements."""
    s = everything
    lengths = [2, b, 2 * b + 1]
    seqs = [tokens_of(10 + i, (1, 30))[0] for i in range(3)]
    prompt = np.zeros((3, max(lengths)), np.int32)
    for i, n in enumerate(lengths):
        prompt[i, :n] = seqs[i][:n]
    logits, state = s.dec.prefill(s.params, prompt, lengths=lengths)
    steps = np.stack([seq[n:n + 12] for seq, n in zip(seqs, lengths)])  # [3, 12]
    stepped, state = stream_steps(s, state, steps)
    for i, n in enumerate(lengths):
        ref = s.full(seqs[i][None])[0]  # causal: the first n + 12 positions are the reference
        assert max_err(logits[i, :n], ref[:n]) <= TOL
        assert max_err(stepped[i], ref[n:n + 12]) <= TOL
    # Changing one element's prompt (and its padding) changes nothing for the others.
    other = prompt.copy()
    other[1] = tokens_of(99, (1, max(lengths)))[0]
    logits2, _ = s.dec.prefill(s.params, other, lengths=lengths)
    assert max_err(logits2[0], logits[0]) == 0.0 and max_err(logits2[2], logits[2]) == 0.0
    assert max_err(logits2[1, :b], logits[1, :b]) > 1e-3


def test_reset_restarts_only_the_chosen_elements(everything):
    s = everything
    toks = tokens_of(5, (B, 14))
    _, state = s.dec.prefill(s.params, toks[:, :7])
    state = s.dec.reset(s.params, state, [True, False])
    logits, _ = s.dec.prefill(s.params, toks[:, 7:], state)
    assert max_err(logits[0], s.full(toks[:1, 7:])[0]) <= TOL  # a fresh stream
    assert max_err(logits[1], s.full(toks[1:, :])[0, 7:]) <= TOL  # carried on
    with pytest.raises(ValueError, match="reset mask"):
        s.dec.reset(s.params, state, [True])


@pytest.mark.parametrize("bounded", [True, False])
def test_rope_reads_the_absolute_stream_position(bounded):
    """A stream started at position 100003 (far past any training length) equals the full
    forward at that offset; bounded RoPE makes it equal to offset 100003 % b and, as the offset
    is not a multiple of b, different from offset 0."""
    s = Setup(make_config(ttt_layer_type="linear", use_rope=True, rope_bounded=bounded))
    toks = tokens_of(6, (B, 11))
    start = 100_003
    state = s.dec.init_state(s.params, B, start_position=start)
    logits, state = s.dec.prefill(s.params, toks[:, :5], state)
    stepped, state = stream_steps(s, state, toks[:, 5:])
    got = jnp.concatenate([logits, stepped], axis=1)
    assert max_err(got, s.full(toks, start)) <= TOL
    assert np.all(np.asarray(state["layers"][0]["ttt"]["position"]) == start + 11)
    if bounded:
        assert max_err(got, s.full(toks, start % b)) <= TOL
    else:
        assert max_err(got, s.full(toks, start % b)) > 1e-3
    assert max_err(got, s.full(toks, 0)) > 1e-3


def test_long_stream_stays_finite_and_exact():
    """Ten times a 64-token training length, TTT-MLP, streamed in chunks of 37 (so every chunk
    after the first starts inside a mini-batch, at each phase in turn) and then by steps."""
    s = Setup(make_config(**VARIANTS["mlp-preconv-rope-l2"]), seed=7)
    toks = tokens_of(8, (1, 640))
    full = s.full(toks)
    state, outs = None, []
    for at in range(0, 629, 37):
        chunk, state = s.dec.prefill(s.params, toks[:, at:at + 37], state)
        outs.append(chunk)
    stepped, _ = stream_steps(s, state, toks[:, 629:])
    got = jnp.concatenate(outs + [stepped], axis=1)
    assert bool(jnp.all(jnp.isfinite(got)))
    assert max_err(got, full) <= TOL


def test_state_size_does_not_grow(everything):
    s = everything
    toks = tokens_of(9, (B, 33))
    sizes = []
    state = s.dec.init_state(s.params, B)
    for n in (1, 32):
        _, state = s.dec.prefill(s.params, toks[:, :n], state)
        sizes.append(sum(x.size for x in jax.tree.leaves(state)))
    assert sizes[0] == sizes[1]


# --- generation -------------------------------------------------------------------------------


def test_greedy_generate_matches_a_manual_argmax_loop(everything):
    s = everything
    prompt = tokens_of(11, (3, 9))
    lengths = [9, 1, 5]
    out, _ = s.dec.generate(s.params, prompt, 6, lengths=lengths)
    assert out.shape == (3, 6) and out.dtype == jnp.int32
    for i, n in enumerate(lengths):
        seq = np.zeros((1, 15), np.int32)  # causal: right padding does not change the logits
        seq[0, :n] = prompt[i, :n]
        for t in range(n, n + 6):
            seq[0, t] = int(jnp.argmax(s.full(seq)[0, t - 1]))
        assert list(np.asarray(out[i])) == list(seq[0, n:n + 6])


def test_sampling_is_a_function_of_the_seed(everything):
    s = everything
    prompt = tokens_of(12, (B, 5))
    hot = Sampling(temperature=1.5)
    a, _ = s.dec.generate(s.params, prompt, 20, sampling=hot, seed=1)
    a2, _ = s.dec.generate(s.params, prompt, 20, sampling=hot, seed=1)
    c, _ = s.dec.generate(s.params, prompt, 20, sampling=hot, seed=2)
    assert np.array_equal(a, a2)
    assert not np.array_equal(a, c)
    g, _ = s.dec.generate(s.params, prompt, 20)
    for narrow in (Sampling(top_k=1), Sampling(temperature=2.0, top_p=1e-6)):
        t, _ = s.dec.generate(s.params, prompt, 20, sampling=narrow, seed=3)
        assert np.array_equal(t, g)


def test_top_k_and_top_p_keep_the_right_tokens():
    from ttt_jax.decode import filter_logits, sample

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 2
    for k in (1, 5, 49):
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), Sampling(top_k=k))))
        for row, keep in zip(logits, kept):
            assert set(np.flatnonzero(keep)) == set(np.argsort(-row)[:k])
    for p in (0.05, 0.5, 0.9):
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), Sampling(top_p=p))))
        for row, keep in zip(logits, kept):
            probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            order = np.argsort(-probs)
            n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest set reaching p
            assert set(np.flatnonzero(keep)) == set(order[:n])
    draws = jax.vmap(lambda key: sample(key, jnp.asarray(logits[:1]), Sampling(top_k=3)))(
        jax.random.split(jax.random.PRNGKey(0), 400))
    assert set(np.unique(np.asarray(draws))) == set(np.argsort(-logits[0])[:3])


def _filtered_softmax(logits, temperature, top_k, top_p):
    """The distribution ``Sampling`` describes, in float64 numpy: softmax of logits /
    temperature over the tokens that are among the ``top_k`` most likely and in the smallest
    most-likely set whose probability reaches ``top_p`` (both on the tempered softmax)."""
    z = np.asarray(logits, np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    k = top_k if 0 < top_k < len(probs) else len(probs)
    n_p = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1) if top_p < 1 else len(probs)
    keep[order[:min(k, n_p)]] = True
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


# (temperature, top_k, top_p): plain, tempered, top-k, top-p, and all three at once.
# With these logits top-k keeps 5, top-p 4, and the last setting 6 (top-k binds) of the 7 top-p
# would keep; the tempered distributions are far from one-hot.
SAMPLING_SETTINGS = [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 5, 1.0), (0.8, 0, 0.7), (1.3, 6, 0.8)]


def test_sampling_follows_the_filtered_softmax():
    """20000 draws per setting (one jitted call over a batch of keys, a fixed seed) against the
    distribution computed above: nothing outside the kept set, every count within 5 standard
    deviations of its expectation, and Pearson's chi-square below df + 6 sqrt(2 df)."""
    from ttt_jax.decode import sample

    n = 20000
    logits = np.random.default_rng(2).standard_normal((1, 12)).astype(np.float32)
    draw = jax.jit(jax.vmap(lambda key, knobs: sample(key, jnp.asarray(logits), knobs)[0],
                            in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    for temperature, top_k, top_p in SAMPLING_SETTINGS:
        knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        counts = np.bincount(np.asarray(draw(keys, knobs)), minlength=logits.shape[-1])
        want = _filtered_softmax(logits[0], temperature, top_k, top_p)
        setting = f"temperature={temperature}, top_k={top_k}, top_p={top_p}"
        assert np.all(counts[want == 0] == 0), setting
        kept = want > 0
        expected = n * want[kept]
        sigma = np.sqrt(expected * (1 - want[kept]))
        assert np.all(np.abs(counts[kept] - expected) <= 5 * sigma + 1), (setting, counts, expected)
        df = int(kept.sum()) - 1
        if df:
            chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
            assert chi2 < df + 6 * np.sqrt(2 * df), (setting, chi2, df)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_bad_decode_input_is_refused(everything):
    s = everything
    with pytest.raises(ValueError, match="vocab_size"):
        s.dec.prefill(s.params, np.full((B, 3), V, np.int32))
    with pytest.raises(ValueError, match=r"shape \[B, n"):
        s.dec.prefill(s.params, np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="lengths"):
        s.dec.prefill(s.params, np.zeros((B, 3), np.int32), lengths=[4, 1])
    _, state = s.dec.prefill(s.params, np.zeros((B, 3), np.int32))
    with pytest.raises(ValueError, match="batch size 3"):
        s.dec.prefill(s.params, np.zeros((3, 3), np.int32), state)
    with pytest.raises(ValueError, match="at least one token"):
        s.dec.generate(s.params, np.zeros((B, 3), np.int32), 2, lengths=[0, 3])
    with pytest.raises(ValueError, match="seq_modeling"):
        Decoder(ModelConfig(vocab_size=V, num_layers=1, intermediate_size=32,
                            ttt=s.cfg.ttt, seq_modeling="swa"))
