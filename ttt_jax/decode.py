"""Streaming decode and generation for the TTT-LM, exact against the full-sequence forward.

A stream's state is a pytree with constant size whatever the context length: per layer, the TTT
weights at the last mini-batch boundary, the gradients accumulated since, the phase inside the
mini-batch, the absolute position (what RoPE reads: ``position % b`` when bounded) and the
causal-conv tails. Every leaf leads with the batch axis, and every element of the batch is its
own stream: own prompt length, own position, own mini-batch boundaries.

    dec = Decoder(model_config)
    logits, state = dec.prefill(params, prompt_tokens)           # [B, L] -> [B, L, V]
    logits, state = dec.prefill(params, more_tokens, state)      # any chunk size, any phase
    logits, state = dec.step(params, state, next_token)          # [B] -> [B, V]
    tokens, state = dec.generate(params, prompt, 200, sampling=Sampling(temperature=0.8, top_p=0.9))

``params`` is the model's params tree (or ``{"params": tree}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.config import ModelConfig
from ttt_jax.models.ttt_lm import TTTLM

DecodeState = Any  # {"layers": [{"ttt": {...}, "conv_tail"?: ...}, ...]}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    Attributes:
      temperature: logits are divided by it; ``0`` means greedy (argmax).
      top_k: keep only the ``k`` most likely tokens (``0``: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
        (nucleus sampling; ``1``: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"Sampling.temperature={self.temperature!r}: expected a number >= 0 "
                             f"(0 means greedy)")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                and self.top_k >= 0):
            raise ValueError(f"Sampling.top_k={self.top_k!r}: expected an int >= 0 (0 means off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"Sampling.top_p={self.top_p!r}: expected a number in (0, 1] "
                             f"(1 means off)")


GREEDY = Sampling(temperature=0.0)


def _knobs(sampling: Sampling):
    """The sampling settings as arrays: changing them does not recompile."""
    return (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
            jnp.float32(sampling.top_p))


def filter_logits(logits: jax.Array, sampling) -> jax.Array:
    """Tempered logits ``[B, V]`` with the tokens outside top-k / top-p set to ``-inf``.

    ``sampling`` is a ``Sampling`` or its ``(temperature, top_k, top_p)`` as (traced) arrays;
    a temperature of 0 is treated as 1 here (``sample`` takes the argmax instead).
    """
    temperature, top_k, top_p = _knobs(sampling) if isinstance(sampling, Sampling) else sampling
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    order = jnp.argsort(-logits, axis=-1)  # most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    keep = jnp.arange(vocab) < k  # [V] in rank order
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = keep & ((before < top_p) | (top_p >= 1.0))  # the most likely token always stays
    keep = jnp.zeros_like(keep).at[jnp.arange(logits.shape[0])[:, None], order].set(keep)
    return jnp.where(keep, logits, -jnp.inf)


def sample(key: jax.Array, logits: jax.Array, sampling) -> jax.Array:
    """Draws one token per row of ``logits [B, V]``; returns ``[B]`` int32 (argmax when the
    temperature is 0)."""
    knobs = _knobs(sampling) if isinstance(sampling, Sampling) else sampling
    drawn = jax.random.categorical(key, filter_logits(logits, knobs), axis=-1)
    return jnp.where(knobs[0] > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _variables(params) -> dict:
    if isinstance(params, dict) and set(params) == {"params"}:
        return params
    return {"params": params}


def _batch_size(state) -> int:
    return int(state["layers"][0]["ttt"]["phase"].shape[0])


class Decoder:
    """Jitted streaming entry points for one ``ModelConfig`` (a TTT-LM).

    Args:
      config: the model's config; ``seq_modeling`` must be ``ttt``.
    """

    def __init__(self, config: ModelConfig):
        if config.seq_modeling != "ttt":
            raise ValueError(f"Decoder streams TTT-LMs: model.seq_modeling is "
                             f"{config.seq_modeling!r}, expected 'ttt'")
        self.config = config
        self.model = TTTLM(config)
        self._init = jax.jit(self._init_impl, static_argnums=1)
        self._prefill = jax.jit(self._prefill_impl)
        self._step = jax.jit(self._step_impl)
        self._generate = jax.jit(self._generate_impl, static_argnums=4)

    # --- traced implementations ---------------------------------------------------------------

    def _init_impl(self, variables, batch_size, start_position):
        return self.model.apply(variables, batch_size, start_position,
                                method=TTTLM.init_cache)

    def _prefill_impl(self, variables, state, tokens, lengths):
        return self.model.apply(variables, tokens, state, lengths, method=TTTLM.stream)

    def _step_impl(self, variables, state, token):
        logits, state = self.model.apply(variables, token[:, None], state, method=TTTLM.stream)
        return logits[:, 0], state

    def _generate_impl(self, variables, state, logits, key, n, sampling):
        def body(carry, _):
            state, logits, key = carry
            key, sub = jax.random.split(key)
            token = sample(sub, logits, sampling)
            logits, state = self._step_impl(variables, state, token)
            return (state, logits, key), token

        (state, _, _), tokens = jax.lax.scan(body, (state, logits, key), None, length=n)
        return jnp.swapaxes(tokens, 0, 1), state

    # --- public API ---------------------------------------------------------------------------

    def init_state(self, params, batch_size: int, start_position=0) -> DecodeState:
        """State of ``batch_size`` empty streams whose first token sits at ``start_position``
        (an int or ``[B]``; RoPE reads it, mini-batches still start at the first token)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        start = jnp.broadcast_to(jnp.asarray(start_position, jnp.int32), (batch_size,))
        return self._init(_variables(params), batch_size, start)

    def prefill(self, params, tokens, state: Optional[DecodeState] = None, lengths=None):
        """Feeds a chunk of tokens to each stream.

        Args:
          params: the model's params.
          tokens: ``[B, n]`` int token ids, any ``n >= 1``.
          state: streams to continue (fresh ones at position 0 if None).
          lengths: ``[B]`` valid tokens per element (prompts of different lengths, right
            padded); the padding is ignored and leaves the state untouched. All if None.

        Returns:
          ``(logits [B, n, V] float32, state')``; logits past an element's length are
          meaningless.
        """
        tokens = self._check_tokens(tokens, "tokens")
        bsz, n = tokens.shape
        if state is None:
            state = self.init_state(params, bsz)
        elif _batch_size(state) != bsz:
            raise ValueError(f"tokens has batch size {bsz} but the state holds "
                             f"{_batch_size(state)} streams")
        if lengths is None:
            lengths = np.full((bsz,), n, np.int32)
        else:
            lengths = np.asarray(lengths)
            if lengths.shape != (bsz,) or lengths.min() < 0 or lengths.max() > n:
                raise ValueError(f"lengths={lengths.tolist()}: expected {bsz} ints in [0, {n}]")
        return self._prefill(_variables(params), state, tokens,
                             jnp.asarray(lengths, jnp.int32))

    def step(self, params, state: DecodeState, token):
        """Feeds one token ``[B]`` to each stream; returns ``(logits [B, V], state')``."""
        return self._step(_variables(params), state, jnp.asarray(token, jnp.int32))

    def reset(self, params, state: DecodeState, mask, start_position=0) -> DecodeState:
        """Restarts the streams where ``mask [B]`` is true; the others are left as they are."""
        mask = jnp.asarray(mask, bool)
        bsz = _batch_size(state)
        if mask.shape != (bsz,):
            raise ValueError(f"reset mask has shape {mask.shape}: expected ({bsz},)")
        fresh = self.init_state(params, bsz, start_position)
        pick = lambda f, s: jnp.where(mask.reshape((bsz,) + (1,) * (s.ndim - 1)), f, s)
        return jax.tree.map(pick, fresh, state)

    def generate(self, params, prompt, n: int, *, lengths=None, sampling: Sampling = GREEDY,
                 seed: int = 0, state: Optional[DecodeState] = None):
        """Prefills ``prompt [B, L]`` and samples ``n`` tokens per element in one jitted scan.

        Args:
          lengths: ``[B]`` prompt lengths (each >= 1) when the prompts are right padded.
          sampling: temperature / top-k / top-p; greedy by default.
          seed: sampling is a function of the seed (and of nothing else).
          state: streams the prompt continues (fresh ones if None).

        Returns:
          ``(tokens [B, n] int32, state')``: the state after the last sampled token was fed.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r}: expected the number of tokens to generate, an int >= 1")
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        prompt = self._check_tokens(prompt, "prompt")
        bsz, length = prompt.shape
        lengths = np.full((bsz,), length) if lengths is None else np.asarray(lengths)
        if lengths.shape == (bsz,) and lengths.min() < 1:
            raise ValueError(f"lengths={lengths.tolist()}: every prompt needs at least one token")
        logits, state = self.prefill(params, prompt, state, lengths)
        last = logits[jnp.arange(bsz), jnp.asarray(lengths) - 1]  # [B, V]
        return self._generate(_variables(params), state, last, jax.random.PRNGKey(seed), n,
                              _knobs(sampling))

    def _check_tokens(self, tokens, name):
        if isinstance(tokens, jax.core.Tracer):
            return tokens
        arr = np.asarray(tokens)
        if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be integer token ids of shape [B, n >= 1], got "
                             f"{arr.dtype}{list(arr.shape)}")
        vocab = self.config.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise ValueError(f"{name} holds ids outside [0, vocab_size={vocab}): "
                             f"min {arr.min()}, max {arr.max()}")
        return jnp.asarray(arr, jnp.int32)


__all__ = ["Decoder", "DecodeState", "GREEDY", "Sampling", "filter_logits", "sample"]
