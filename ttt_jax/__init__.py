"""ttt-jax: Test-Time Training layers with bounded-position RoPE, in JAX/Flax.

The names below are imported on first use, so that light parts of the package (``ttt_jax.prepare``
and its worker processes) start without loading JAX.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "ttt_jax.config", "RunConfig": "ttt_jax.config",
    "TTTConfig": "ttt_jax.config", "apply_overrides": "ttt_jax.config",
    "from_dict": "ttt_jax.config", "load_config": "ttt_jax.config",
    "save_config": "ttt_jax.config", "to_dict": "ttt_jax.config",
    "TTTLM": "ttt_jax.models.ttt_lm", "Block": "ttt_jax.models.ttt_lm",
    "TTTLayer": "ttt_jax.nn.ttt_layer", "SequenceMetadata": "ttt_jax.types",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ttt_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
