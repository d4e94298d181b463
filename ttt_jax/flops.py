"""Model FLOPs, counted from the traced program, and device peaks: the MFU that training logs.

``forward_flops(fn, *args)`` traces ``fn`` (nothing is compiled) and adds up the FLOPs of its
matrix products and convolutions, every equation of every sub-program included: a ``scan``
body counts ``length`` times (the TTT inner loop over mini-batches, layers scanned over
depth), a ``cond`` counts its most expensive branch, a ``while`` body once (its trip count is
not known when tracing). Element-wise work is left out, as in the usual MFU accounting.

A training step costs about three forwards (the backward pass twice the forward's products),
so the model FLOPs per trained token are ``3 * forward_flops / tokens``; recomputation under
``remat`` is not model work and is not counted (the forward is traced without it).

``peak_flops`` is the device's dense peak: ``train.peak_tflops`` when set, else the bf16 dense
figure of a known accelerator (``PEAK_TFLOPS``), else ``None`` (no MFU is logged: CPUs and
unknown devices have no single peak worth quoting).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr

from ttt_jax.math import cpu_kernel

# Dense bf16 peak TFLOP/s by device kind (a substring of ``jax.Device.device_kind``), first
# match wins; the vendors' published figures without sparsity.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10G", 70.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape  # the batch and both free dimensions
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape  # the kernel: out features, in features / groups, spatial...
    dn = eqn.params["dimension_numbers"]
    out_features = rhs[dn.rhs_spec[0]]
    per_output = math.prod(rhs) / out_features  # (in / groups) * kernel size
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _subprograms(eqn):
    for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
            if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                yield sub


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the matrix products and convolutions of a (closed) jaxpr (module docstring)."""
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "while":
            total += jaxpr_flops(eqn.params["body_jaxpr"])
        else:
            total += sum(jaxpr_flops(sub) for sub in _subprograms(eqn))
    return total


def forward_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of the matrix products of ``fn(*args)``, traced with abstract values only.

    Traced with the CPU kernel off (``cpu_kernel.disabled``): its products are inside
    one opaque call, so the trace takes the XLA scan, whose products are the same.
    """
    with cpu_kernel.disabled():
        return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def train_flops_per_token(apply_fn: Callable, params, tokens) -> float:
    """Model FLOPs of one trained token: three forwards of ``apply_fn(params, tokens)``
    (``tokens``: ``[B, L, ...]`` model inputs) over its ``B * L`` positions."""
    shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    batch, length = tokens.shape[:2]
    return 3.0 * forward_flops(apply_fn, shape, tokens) / (batch * length)


def peak_flops(override_tflops: Optional[float] = None,
               device: Optional[jax.Device] = None) -> Optional[float]:
    """The device's peak FLOP/s (module docstring); ``None`` when unknown."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    kind = (device or jax.devices()[0]).device_kind
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None
