"""Streaming generation from ``MoshiLM``: moshi's ``LMGen`` in JAX (docs/moshi.md, "Streaming
generation").

``MoshiGen`` runs a Moshi model as a conversation partner, one frame (80 ms) at a time: each
step it takes the other speaker's audio codes of the frame (the ``n_q - dep_q`` user streams)
and samples the model's own tokens, a text token and ``dep_q`` audio tokens. One step is one
jitted function (``gen_step``):

1. The ``K = n_q + 1`` input ids of the frame are read from the token ring (below), each
   stream's initial token (``text_card`` / ``card``) while the step's offset is ``<=`` the
   stream's delay; their embeddings are summed (audio streams, then text) and go through the
   temporal transformer's streaming path (``StreamingTransformer.stream``: a KV window of
   ``context`` frames per layer and every grafted layer's TTT state), ``out_norm`` and
   ``text_linear``: the text token is sampled from those logits (``temp_text``,
   ``top_k_text``).
2. The depformer then samples the ``dep_q`` audio tokens in a chain: step ``s`` reads
   ``depformer_in[s](h)`` plus the embedding of the token sampled just before it (the text
   token for ``s = 0``, audio codebook ``s - 1`` after), and codebook ``s`` is sampled from
   ``linears[s]`` (``temp``, ``top_k``). The depformer is run over the growing prefix of its
   steps (it is causal, so step ``s``'s output is the one moshi's step-by-step cache gives);
   nothing of it is kept between frames.

The delays. Every stream is generated and fed in delayed coordinates: stream ``k`` at step
``o`` is the delayed sequence's position ``o``, i.e. frame ``o - delays[k]``. Like ``LMGen``,
the state keeps a ring of ``max_delay + 2`` positions per stream (``GenState.tokens``, filled
with the "not generated" id ``-2`` at start):

- the user's codes given at step ``o`` are written at ``(o + delays[k]) % R`` of their rows;
- the input of step ``o`` is position ``o % R`` of every row, or the initial token where
  ``o <= delays[k]`` (so the user frame given at step 0 is never read, as in ``LMGen``);
- the tokens sampled at step ``o`` are written at ``(o + 1) % R`` (the next step's input);
- after step ``o`` the frame ``o - max_delay`` is complete: stream ``k``'s token is at
  ``(o + 1 - max_delay + delays[k]) % R``. For the first ``max_delay`` steps there is no
  complete frame and ``step`` returns None, exactly where ``LMGen.step`` does.

The state (``GenState``: transformer cache, ring, offset) has the same shapes at every step,
whatever the length of the conversation.

Taken from moshi's ``LMGen`` (``moshi.models.lm``, 0.2.13): the argument names and defaults
(``use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25``), the ring and its
read/write positions, the initial-token rule, the depformer chain and the sampler
(``softmax(logits / temp)``, the ``top_k`` most likely kept, one draw by the exponential race
``argmax(p / E)``, ``E ~ Exp(1)``, which picks ``i`` with probability ``p_i / sum(p)``; argmax
when ``use_sampling`` is false or ``temp <= 0``). Not supported: classifier-free guidance
(``cfg_coef != 1`` is refused), conditioning, per-element reset or execution masks,
``depformer_replace_tokens`` and hooks. The random draws are JAX's, so sampled tokens differ
from moshi's for the same seed; greedy tokens are moshi's (``tests/test_moshi_gen.py``).

``generate(user_codes [B, K_user, T])`` runs a whole recording and returns ``[B, dep_q + 1, T]``
in the layout of the training codes: frame ``t`` of the user's codes is given at step ``t + 1``
(the first frame twice, since the input of step 0 is the initial tokens), ``max_delay - 1``
further steps with the zero token ``-1`` ("no input", an exact zero embedding) for the user
complete the last frames, and output frame ``t`` stands beside user frame ``t``: stacked
(model rows, then user rows) they are a ``[K, T]`` array the training forward reads, and its
greedy predictions are the generated tokens.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.moshi.lm import UNGENERATED_TOKEN_ID, ZERO_TOKEN_ID, MoshiLM
from ttt_jax.moshi.lm_config import MoshiLMConfig


class Sampling(NamedTuple):
    """How tokens are drawn (``LMGen``'s arguments); traced, so changing them recompiles
    nothing."""

    use_sampling: bool = True
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25


class GenState(NamedTuple):
    """The streaming state of ``B`` conversations (a pytree of constant shapes).

    Attributes:
      cache: the temporal transformer's streaming cache (KV window, TTT state, position).
      tokens: ``[B, K, max_delay + 2]`` int32, the ring of delayed tokens of every stream.
      offset: ``[]`` int32, the steps taken.
    """

    cache: Any
    tokens: jax.Array
    offset: jax.Array


def sample_token(logits, key, use_sampling, temp, top_k):
    """``[..., V]`` float logits -> ``[...]`` int32 token ids (module docstring).

    ``use_sampling``, ``temp`` and ``top_k`` may be traced: one compiled step serves every
    setting. ``top_k`` keeps exactly the ``k`` most likely (ties by lower id; ``<= 0``: all)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    temp = jnp.asarray(temp, jnp.float32)
    probs = jax.nn.softmax(logits / jnp.where(temp > 0, temp, 1.0), axis=-1)
    rank = jnp.argsort(jnp.argsort(-probs, axis=-1, stable=True), axis=-1)
    probs = jnp.where((top_k <= 0) | (rank < top_k), probs, 0.0)
    race = probs / jax.random.exponential(key, probs.shape, jnp.float32)
    sampled = jnp.argmax(race, axis=-1)
    return jnp.where(jnp.asarray(use_sampling) & (temp > 0), sampled, greedy).astype(jnp.int32)


def max_delay(config: MoshiLMConfig) -> int:
    return max(config.delays)


def user_streams(config: MoshiLMConfig) -> int:
    """The user's audio streams (``n_q - dep_q``): input only, never generated."""
    return config.n_q - config.dep_q


def _init_cache(module, batch: int):
    return module.transformer.init_cache(batch)


def _temporal_step(module, inputs, cache):
    """One frame of the temporal path on the ids ``inputs [B, K]``:
    ``(h [B, 1, d], text logits [B, V] float32, cache')``."""
    h, cache = module.transformer.stream(module.embed(inputs[:, :, None]), cache)
    h = module.out_norm(h)
    return h, module.text_linear(h)[:, 0].astype(jnp.float32), cache


def _depformer_sample(module, h, text_token, keys, sampling: Sampling):
    """The ``dep_q`` audio tokens ``[B, dep_q]`` of the frame, sampled in a chain after
    ``text_token [B]`` (module docstring, step 2)."""
    cfg = module.config
    prev, inputs, tokens = text_token, [], []
    for s in range(cfg.dep_q):
        emb = module.depformer_text_emb if s == 0 else module.depformer_emb[s - 1]
        inputs.append(module.depformer_in[cfg.depformer_in_index(s)](h) + emb(prev[:, None]))
        out = module.depformer(jnp.concatenate(inputs, axis=1))  # [B, s + 1, d']
        logits = module.linears[s](out[:, s]).astype(jnp.float32)
        prev = sample_token(logits, keys[s], sampling.use_sampling, sampling.temp,
                            sampling.top_k)
        tokens.append(prev)
    return jnp.stack(tokens, axis=1)


@partial(jax.jit, static_argnums=(0, 1))
def gen_init(config: MoshiLMConfig, batch: int, variables) -> GenState:
    """A fresh ``GenState`` of ``batch`` conversations."""
    cache = MoshiLM(config).apply(variables, batch, method=_init_cache)
    ring = max_delay(config) + 2
    tokens = jnp.full((batch, config.num_codebooks, ring), UNGENERATED_TOKEN_ID, jnp.int32)
    return GenState(cache, tokens, jnp.zeros((), jnp.int32))


@partial(jax.jit, static_argnums=(0,))
def gen_step(config: MoshiLMConfig, sampling: Sampling, variables, state: GenState, user, key):
    """One frame: ``(state', tokens [B, dep_q + 1])``, text first; the tokens are those of
    frame ``offset' - 1 - max_delay`` (``-2`` everywhere while no frame is complete).

    ``sampling``: a ``Sampling`` (traced). ``user``: ``[B, n_q - dep_q]`` int, the user's codes
    of the frame. ``key``: a PRNG key (unused when greedy)."""
    model = MoshiLM(config)
    delays, dep_q = config.delays, config.dep_q
    ring, top = max_delay(config) + 2, max_delay(config)
    o, tokens = state.offset, state.tokens
    for k in range(dep_q + 1, config.num_codebooks):
        tokens = tokens.at[:, k, (o + delays[k]) % ring].set(user[:, k - dep_q - 1])
    initial = jnp.asarray(model.initial_ids, jnp.int32)
    is_init = o <= jnp.asarray(delays, jnp.int32)
    inputs = jnp.where(is_init[None], initial[None], tokens[:, :, o % ring])
    keys = jax.random.split(key, dep_q + 1)
    h, text_logits, cache = model.apply(variables, inputs, state.cache, method=_temporal_step)
    text = sample_token(text_logits, keys[0], sampling.use_sampling, sampling.temp_text,
                        sampling.top_k_text)
    audio = model.apply(variables, h, text, keys[1:], sampling, method=_depformer_sample)
    o = o + 1
    tokens = tokens.at[:, 0, o % ring].set(text)
    tokens = tokens.at[:, 1:dep_q + 1, o % ring].set(audio)
    where = (o - top + jnp.asarray(delays[:dep_q + 1], jnp.int32)) % ring
    out = tokens[:, jnp.arange(dep_q + 1), where]
    out = jnp.where(o > top, out, UNGENERATED_TOKEN_ID)
    return GenState(cache, tokens, o), out


class MoshiGen:
    """Frame-by-frame generation from a ``MoshiLM`` (module docstring); moshi's ``LMGen``.

    Args:
      config: the model's ``MoshiLMConfig``.
      params: its params (the tree under ``"params"``).
      temp, temp_text: temperatures of the audio and text tokens.
      top_k, top_k_text: the most likely tokens kept (0: all).
      use_sampling: sample (True) or take the argmax (greedy).
      cfg_coef: classifier-free guidance; only 1 (none) is supported.
      batch: conversations generated together.
    """

    def __init__(self, config: MoshiLMConfig, params, *, temp: float = 0.8,
                 temp_text: float = 0.7, top_k: int = 250, top_k_text: int = 25,
                 use_sampling: bool = True, cfg_coef: float = 1.0, batch: int = 1):
        if not isinstance(config, MoshiLMConfig):
            raise TypeError(f"MoshiGen expects a MoshiLMConfig, got {type(config).__name__}")
        if cfg_coef != 1.0:
            raise ValueError(f"cfg_coef={cfg_coef} is not supported: expected 1.0 (MoshiGen "
                             f"has no classifier-free guidance)")
        for name, value in (("top_k", top_k), ("top_k_text", top_k_text), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
                    1 if name == "batch" else 0):
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= "
                                 f"{1 if name == 'batch' else 0}")
        for name, value in (("temp", temp), ("temp_text", temp_text)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(
                    value) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a number >= 0 "
                                 f"(0: greedy)")
        self.config = config
        self.batch = int(batch)
        self.sampling = Sampling(bool(use_sampling), float(temp), float(temp_text), int(top_k),
                                 int(top_k_text))
        self.variables = {"params": params}
        self.max_delay = max_delay(config)
        self.user_streams = user_streams(config)
        self.state: GenState = self.init_state()
        self.frames = 0  # steps taken since the last reset (host side: when to return None)

    def init_state(self) -> GenState:
        """A fresh state (the ``batch`` conversations at their start)."""
        return gen_init(self.config, self.batch, self.variables)

    def reset(self) -> None:
        """Starts the conversations again from a fresh state."""
        self.state = self.init_state()
        self.frames = 0

    @property
    def greedy(self) -> bool:
        s = self.sampling
        return not s.use_sampling or (s.temp <= 0 and s.temp_text <= 0)

    def _user(self, codes) -> jax.Array:
        want = (self.batch, self.user_streams)
        if codes is None:
            return jnp.full(want, ZERO_TOKEN_ID, jnp.int32)
        shape = tuple(np.shape(codes))
        dtype = getattr(codes, "dtype", np.asarray(codes).dtype)
        if shape != want or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"user_audio_codes must be integer codes of shape [B, n_q - dep_q] "
                             f"= {list(want)}, got {dtype}{list(shape)}")
        return jnp.asarray(codes, jnp.int32)

    def step(self, user_audio_codes=None, key: Optional[jax.Array] = None):
        """One frame. ``user_audio_codes``: ``[B, n_q - dep_q]`` int, the user's codes of this
        frame (ids ``< card``, or ``-1`` for no input); None gives ``-1`` for every user stream.
        ``key``: a PRNG key, required when sampling.

        Returns ``[B, dep_q + 1]`` int32 (text, then the ``dep_q`` audio codebooks) of the
        frame that became complete, or None during the first ``max_delay`` steps."""
        user = self._user(user_audio_codes)
        if key is None:
            if not self.greedy:
                raise ValueError("key is required when sampling (use_sampling=True with a "
                                 "temperature > 0): pass a jax.random.PRNGKey")
            key = jax.random.PRNGKey(0)
        self.state, out = gen_step(self.config, self.sampling, self.variables, self.state,
                                   user, key)
        self.frames += 1
        return None if self.frames <= self.max_delay else out

    def generate(self, user_codes, key: Optional[jax.Array] = None) -> np.ndarray:
        """A whole recording from a fresh state: ``user_codes [B, n_q - dep_q, T]`` ->
        ``[B, dep_q + 1, T]`` int32 (module docstring: frame ``t`` of the output stands beside
        user frame ``t``). The state is reset first."""
        codes = np.asarray(user_codes)
        want = (self.batch, self.user_streams)
        if codes.ndim != 3 or codes.shape[:2] != want or codes.shape[2] < 1 or not np.issubdtype(
                codes.dtype, np.integer):
            raise ValueError(f"user_codes must be integer codes of shape [B, n_q - dep_q, T] = "
                             f"[{want[0]}, {want[1]}, T >= 1], got {codes.dtype}"
                             f"{list(codes.shape)}")
        bad = (codes < ZERO_TOKEN_ID) | (codes >= self.config.card)
        if bad.any():
            b, k, t = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"user_codes[{b}, {k}, {t}] = {int(codes[b, k, t])} is out of "
                             f"range: expected ids in [0, card = {self.config.card}) or -1 "
                             f"(no input)")
        if key is None and not self.greedy:
            raise ValueError("key is required when sampling: pass a jax.random.PRNGKey")
        length = codes.shape[2]
        self.reset()
        frames = []
        none = np.full(want, ZERO_TOKEN_ID, np.int32)
        for step in range(length + self.max_delay):
            frame = codes[:, :, max(step - 1, 0)] if step <= length else none
            out = self.step(frame.astype(np.int32),
                            None if key is None else jax.random.fold_in(key, step))
            if out is not None:
                frames.append(out)
        return np.asarray(jnp.stack(frames, axis=2))
