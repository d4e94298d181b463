"""The product of a linear layer, ``x @ W``, whose derivative takes both gradients as 2-D products.

``dense_dot`` is a drop-in ``dot_general`` for ``flax.linen.Dense`` (its ``dot_general``
attribute): the forward is ``lax.dot_general`` unchanged, so values and compiled forward
programs are those of the plain layer. The derivative is written by hand
(``jax.custom_vjp``), with the input's leading axes flattened first:

    dx = g W^T                    ([..., out] x [in, out]^T)
    dW = x2^T g2                  (x2 = x as [N, in], g2 = g as [N, out]; contracted over N)

Autodiff of the plain product contracts the ``[B, L, in]`` input with the ``[B, L, out]``
cotangent over both leading axes at once. On the CPU, XLA lays that out as a transposed copy
of the cotangent (fused into whatever produced it) ahead of the product: for TTT-Linear's layer
at B=2, L=8192 the copies took about 190 of 1240 ms of forward+backward
(``benchmarks/README.md``). The 2-D form is one product with no copy.

Only ``nn.Dense``'s own contraction (the input's last axis with a 2-D kernel's first, no batch
axes) takes the hand-written path; any other ``dimension_numbers`` go to ``lax.dot_general``.
Reverse mode only (a ``jax.custom_vjp``, as ``layernorm.layer_norm_lean``): ``jax.jvp`` through
a layer that uses it raises.
"""

from __future__ import annotations

import functools

import jax
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, precision, preferred_element_type):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def _dense_fwd(x, w, precision, preferred_element_type):
    return _dense(x, w, precision, preferred_element_type), (x, w)


def _dense_bwd(precision, preferred_element_type, res, g):
    del preferred_element_type
    x, w = res
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    dw = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` with ``nn.Dense``'s contraction differentiated as 2-D products.

    Same signature and values as ``lax.dot_general``; see the module docstring.
    """
    if rhs.ndim == 2 and lhs.ndim >= 1 and dimension_numbers == (((lhs.ndim - 1,), (0,)),
                                                                  ((), ())):
        return _dense(lhs, rhs, precision, preferred_element_type)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
