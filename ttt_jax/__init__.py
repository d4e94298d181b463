"""ttt-jax: Test-Time Training layers with bounded-position RoPE, in JAX/Flax."""

from ttt_jax.config import (ModelConfig, RunConfig, TTTConfig, apply_overrides, from_dict,
                            load_config, save_config, to_dict)
from ttt_jax.models.ttt_lm import TTTLM, Block
from ttt_jax.nn.ttt_layer import TTTLayer
from ttt_jax.types import SequenceMetadata

__all__ = [
    "Block", "ModelConfig", "RunConfig", "SequenceMetadata", "TTTConfig", "TTTLM", "TTTLayer",
    "apply_overrides", "from_dict", "load_config", "save_config", "to_dict",
]
__version__ = "0.1.0"
