"""Configuration: frozen dataclasses validated at construction, loaded from and saved to YAML.

Every section is a frozen dataclass whose ``__post_init__`` raises ``ValueError`` naming the
field, the bad value and what is allowed (``checks``); ``model`` holds the TTT layer and the
TTT-LM, ``run`` the training sections, ``yaml_io`` the strict YAML round trip and overrides.
"""

from ttt_jax.config.checks import (_check_bools, _check_choice, _check_fraction, _check_int,
                                   _check_positive, _check_positive_ints, _fail)
from ttt_jax.config.model import (MLP_EXPANSION, DType, ModelConfig, RopeLayout, SeqModeling,
                                  TTTConfig, TTTLayerType)
from ttt_jax.config.run import (MESH_AXES, CheckpointConfig, DataConfig, DataSource, MeshConfig,
                                OptimConfig, RunConfig, TokenDType, TrainConfig,
                                check_batch_fits_mesh)
from ttt_jax.config.yaml_io import (apply_overrides, from_dict, load_config, parse_yaml, read_yaml,
                                    save_config, to_dict)

__all__ = [
    "MESH_AXES", "MLP_EXPANSION", "CheckpointConfig", "DType", "DataConfig", "DataSource",
    "MeshConfig", "ModelConfig", "OptimConfig", "RopeLayout", "RunConfig", "SeqModeling",
    "TTTConfig", "TTTLayerType", "TokenDType", "TrainConfig", "apply_overrides",
    "check_batch_fits_mesh", "from_dict", "load_config", "parse_yaml", "read_yaml", "save_config",
    "to_dict",
]
