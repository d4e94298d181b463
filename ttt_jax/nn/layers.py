"""Small Linen building blocks: RMSNorm, LayerNorm, SwiGLU, causal depthwise conv, the pre-conv block.

Parameter names follow the ttt-lm-pytorch modules so that export is a name-for-name mapping
(``weight`` for norms, ``gate_proj/up_proj/down_proj`` for SwiGLU, ``kernel/bias`` for convs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.math.dense import dense_dot
from ttt_jax.math.layernorm import layer_norm_lean


def symmetric_uniform(bound: float):
    """Initialiser drawing from ``U(-bound, bound)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32, scaled in the input dtype.

    Attributes:
      eps: added to the mean square.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nn.Module):
    """``scale * (x - mean) / sqrt(var + eps) + bias`` over the last axis, in float32.

    The parameters (``scale``, ``bias``) and values of ``flax.linen.LayerNorm`` with
    ``use_fast_variance=False``; its derivative keeps only the input (``layer_norm_lean``), not
    the scale broadcast to the input's shape.

    Attributes:
      features: the normalised width.
      epsilon: added to the variance.
    """

    features: int
    epsilon: float = 1e-6

    def setup(self):
        self.scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)

    def __call__(self, x):
        return layer_norm_lean(x.astype(jnp.float32), self.scale, self.bias, self.epsilon)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases.

    Attributes:
      hidden: intermediate width.
      init_std: std of the normal initialiser.
      dtype: compute dtype.
    """

    hidden: int
    init_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name,
                                         kernel_init=nn.initializers.normal(self.init_std),
                                         dot_general=dense_dot)
        h = nn.silu(dense(self.hidden, "gate_proj")(x)) * dense(self.hidden, "up_proj")(x)
        return dense(x.shape[-1], "down_proj")(h)


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise 1-D conv with bias: ``y[t] = sum_k kernel[k] * x[t - K + 1 + k] + bias``.

    ``kernel: [K, C]``; the last tap multiplies the current token (torch's ``[C, 1, K]`` layout
    transposed). Positions before the start read zeros, or the given ``tail``.

    Attributes:
      kernel_size: ``K``.
      dtype: compute dtype.
    """

    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, tail=None):
        """Args: x ``[B, L, C]``; tail ``[B, K-1, C]`` inputs preceding ``x`` (zeros if None)."""
        k, c = self.kernel_size, x.shape[-1]
        bound = 1.0 / (k ** 0.5)  # torch Conv1d's default for a depthwise conv (fan_in = K)
        kernel = self.param("kernel", symmetric_uniform(bound), (k, c), jnp.float32)
        bias = self.param("bias", symmetric_uniform(bound), (c,), jnp.float32)
        x = x.astype(self.dtype)
        if tail is None:
            tail = jnp.zeros((x.shape[0], k - 1, c), x.dtype)
        padded = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, K-1+L, C]
        length = x.shape[1]
        y = sum(padded[:, i:i + length] * kernel[i].astype(x.dtype) for i in range(k))
        return y + bias.astype(x.dtype)


class PreConv(nn.Module):
    """The pre-TTT conv sub-block: ``Conv(RMSNorm(x))`` (the caller adds the residual).

    Attributes:
      kernel_size: conv width.
      eps: RMSNorm epsilon.
      dtype: compute dtype.
    """

    kernel_size: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    def setup(self):
        self.norm = RMSNorm(self.eps)
        self.conv = CausalDepthwiseConv(self.kernel_size, self.dtype)

    def __call__(self, x):
        return self.conv(self.norm(x))

    def stream(self, x, tail, lengths):
        """``(Conv(RMSNorm(x)) continued from tail, tail')``; see ``last_inputs``."""
        h = self.norm(x)
        return self.conv(h, tail), last_inputs(tail, h, lengths)


def last_inputs(tail, x, lengths):
    """A causal conv's state after a chunk: the last ``K-1`` inputs up to each element's length.

    Args:
      tail: ``[B, K-1, C]`` the inputs preceding the chunk.
      x: ``[B, n, C]`` the chunk.
      lengths: ``[B]`` valid inputs per element.
    """
    joined = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, K-1+n, C]
    idx = lengths[:, None] + jnp.arange(tail.shape[1], dtype=jnp.int32)  # [B, K-1]
    return jnp.take_along_axis(joined, idx[:, :, None], axis=1).astype(tail.dtype)
