"""Export of TTT-LM params to PyTorch (ttt-lm-pytorch's ``TTTForCausalLM``) and import back.

``python -m ttt_jax.export export|import ...`` is the command-line form (``__main__.py``).
"""

from ttt_jax.export.mapping import param_rules
from ttt_jax.export.torch import load_torch, read_state_dict, reference_config, save_torch

__all__ = ["load_torch", "param_rules", "read_state_dict", "reference_config", "save_torch"]
