"""What ``train.py`` builds for a Moshi-TTT run (``architecture: moshi_ttt``).

The training loop itself is ``ttt_jax.trainer.run``; this module supplies its parts: the frame
datasets, the model, the param-group optimizer and the initial state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.moshi.config import MoshiRunConfig, MoshiTTTConfig
from ttt_jax.moshi.data import make_frames_dataset
from ttt_jax.moshi.hybrid import MoshiTTTLM
from ttt_jax.moshi.training import init_params, make_optimizer, sample_tokens
from ttt_jax.training import TrainState


def build_datasets(cfg: MoshiRunConfig):
    """Train and validation frame datasets."""
    common = dict(vocab_sizes=cfg.model.vocab_sizes, seed=cfg.train.seed)
    return (make_frames_dataset(cfg.data, split="train", **common),
            make_frames_dataset(cfg.data, split="val", **common))


def count_params(cfg: MoshiTTTConfig) -> int:
    """Parameter count from shapes only (``jax.eval_shape``; nothing allocated)."""
    shapes = jax.eval_shape(MoshiTTTLM(cfg).init, jax.random.PRNGKey(0),
                            sample_tokens(cfg, cfg.ttt.mini_batch_size))
    return sum(x.size for x in jax.tree.leaves(shapes))


def build_parts(cfg: MoshiRunConfig):
    """``(model, optimizer, init)`` for ``ttt_jax.trainer.run``; ``init(key) -> TrainState``
    is pure (the trainer jits it): fresh params, no-op TTT blocks with ``ttt.noop_init``.

    A Moshi backbone enters a run through ``checkpoint.init_from``: convert its weights into
    a run directory first (``python -m ttt_jax.moshi.convert import ...``)."""
    model = MoshiTTTLM(cfg.model)
    optimizer = make_optimizer(cfg.optim, cfg.model.ttt, cfg.train.steps)

    def init(key) -> TrainState:
        params = init_params(cfg.model, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))

    return model, optimizer, init
