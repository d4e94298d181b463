"""LoRA: low-rank adapters on linear layers, trained while the layer's own kernel is frozen.

A ``LoRADense`` computes ``y = x W + scaling * (x A) B`` with ``W [in, out]`` (the ``kernel``
of the ``nn.Dense`` it replaces, same name and shape, so weights load into it unchanged),
``A [in, r]`` (``lora_a``, uniform in ``±1/sqrt(in)``) and ``B [r, out]`` (``lora_b``, zeros): a
freshly added adapter changes nothing. ``scaling`` multiplies the low-rank product directly
(the Moshi fine-tuning code's convention; ``alpha / r`` in the LoRA paper's terms).

``merge(params, scaling)`` folds every adapter into its kernel, ``W + scaling * A B``, and drops
``lora_a`` / ``lora_b``: the tree of the model without LoRA, which computes the same function
(what export writes). Which layers get adapters is the model's choice (``LoRAConfig.targets``,
a regular expression over module paths).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.config.checks import _check_bools, _check_positive, _fail

LORA_PARAMS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The ``lora:`` section: low-rank adapters on a model's linear layers.

    Attributes:
      enable: add adapters (``false``: the plain model, its param tree unchanged).
      rank: ``r``, the adapters' inner width.
      scaling: the factor on ``x A B`` (Moshi fine-tuning's ``lora.scaling``; ``alpha / r``).
      dropout: dropout on the adapter's input; only 0 is supported (the merged export would
        otherwise differ from the trained function).
      targets: a regular expression over module paths such as
        ``transformer/layers_0/self_attn/in_proj``; matching linear layers get adapters.
      freeze_base: train only the adapters (and the TTT layers, whose params are not
        adapted): every other param is frozen.
    """

    enable: bool = False
    rank: int = 64
    scaling: float = 2.0
    dropout: float = 0.0
    targets: str = r"(self_attn|gating)"
    freeze_base: bool = True

    def __post_init__(self):
        _check_bools("lora", self, ("enable", "freeze_base"))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            _fail("lora", "rank", self.rank, "a positive integer")
        _check_positive("lora", "scaling", self.scaling)
        if self.dropout != 0:
            _fail("lora", "dropout", self.dropout, "0 (adapter dropout is not supported: the "
                  "merged export must compute the trained function)")
        try:
            re.compile(self.targets)
        except (re.error, TypeError) as e:
            _fail("lora", "targets", self.targets, f"a regular expression ({e})")

    def applies_to(self, path: str) -> bool:
        """Whether the linear layer at module ``path`` (``a/b/c``) gets an adapter."""
        return self.enable and re.search(self.targets, path) is not None


class LoRADense(nn.Module):
    """``nn.Dense`` (no bias) plus an optional low-rank adapter (module docstring).

    Attributes:
      features: output width.
      rank: adapter rank; 0 means no adapter (exactly ``nn.Dense``'s params and output).
      scaling: factor on the adapter's product.
      dtype: compute dtype.
      kernel_init: the kernel's initialiser.
    """

    features: int
    rank: int = 0
    scaling: float = 1.0
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.rank:
            bound = 1.0 / fan_in ** 0.5
            a = self.param("lora_a", _uniform(bound), (fan_in, self.rank), jnp.float32)
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features),
                           jnp.float32)
            y = y + self.scaling * jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype))
        return y


def _uniform(bound: float):
    """Uniform in ``[-bound, bound)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, lora: Optional[LoRAConfig], path: str, *, name: str, dtype=jnp.float32,
          kernel_init: Callable = nn.initializers.lecun_normal()) -> LoRADense:
    """A bias-free linear layer named ``name`` at module path ``path/name``, with an adapter
    when ``lora`` targets it."""
    full = f"{path}/{name}" if path else name
    rank = lora.rank if lora is not None and lora.applies_to(full) else 0
    return LoRADense(features, rank=rank, scaling=lora.scaling if rank else 1.0, dtype=dtype,
                     kernel_init=kernel_init, name=name)


def has_lora(params: Mapping) -> bool:
    """Whether any adapter is in the tree."""
    if not isinstance(params, Mapping):
        return False
    return any(k in LORA_PARAMS or has_lora(v) for k, v in params.items())


def merge(params: Mapping, scaling: float) -> dict:
    """The tree without adapters: each ``kernel`` beside ``lora_a`` / ``lora_b`` becomes
    ``kernel + scaling * lora_a @ lora_b`` (computed in float32)."""
    out = {}
    for key, value in params.items():
        if key in LORA_PARAMS:
            continue
        if isinstance(value, Mapping):
            out[key] = merge(value, scaling)
        elif key == "kernel" and "lora_a" in params:
            a = jnp.asarray(params["lora_a"], jnp.float32)
            b = jnp.asarray(params["lora_b"], jnp.float32)
            out[key] = (jnp.asarray(value, jnp.float32) + scaling * (a @ b)).astype(
                jnp.asarray(value).dtype)
        else:
            out[key] = value
    return out


def is_lora_path(path: str) -> bool:
    """Whether a param path (``a/b/c``) is an adapter's."""
    return path.rsplit("/", 1)[-1] in LORA_PARAMS
