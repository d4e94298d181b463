"""Per-device memory of a training run under its sharding rules, from shapes alone
(``train --check`` prints it; docs/moshi.md, "Sharded runs"). Nothing is compiled or
allocated: the state comes from ``jax.eval_shape`` and the activations from the traced VJP's
saved residuals.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
from jax.sharding import PartitionSpec as P

from ttt_jax.config import MESH_AXES, MeshConfig
from ttt_jax.sharding import LAYER_WORKING_SETS, opt_state_specs, rules_for, spec_for
from ttt_jax.tree import flatten


def estimate_mesh_sizes(mesh_cfg: Optional[MeshConfig], device_count: int) -> dict[str, int]:
    """The axis sizes the estimate assumes: ``mesh_cfg`` resolved for ``device_count`` devices
    when it fits them, else for exactly its fixed axes (a ``-1`` axis of size 1); no mesh: one
    device."""
    if mesh_cfg is None:
        return {a: 1 for a in MESH_AXES}
    free = any(getattr(mesh_cfg, a) == -1 for a in MESH_AXES)
    fixed = mesh_cfg.fixed_size
    n = device_count if free and device_count % fixed == 0 else fixed
    return mesh_cfg.resolve(n)


def _per_device(leaf, spec: P, sizes: dict[str, int]) -> float:
    split = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                split *= sizes[axis]
    return leaf.size * leaf.dtype.itemsize / split


def residual_bytes(f: Callable, *args) -> int:
    """Bytes that the backward pass of ``f(*args)`` keeps (``jax.ad_checkpoint``'s saved
    residuals of the traced VJP; ``args`` may be ``jax.ShapeDtypeStruct``), the arguments
    themselves excluded."""
    from jax._src.ad_checkpoint import saved_residuals

    return sum(math.prod(aval.shape) * aval.dtype.itemsize
               for aval, where in saved_residuals(f, *args)
               if not where.startswith("from the argument"))


def activation_bytes(cfg, arch, rows: int, params=None) -> int:
    """Bytes of the activations the backward pass keeps for ``rows`` sequences of the run's
    loss (``jax.ad_checkpoint`` saved residuals of the traced VJP, under the model's own
    remat; nothing compiled or allocated), params excluded. ``params``: the param shapes, if
    already known."""
    from ttt_jax import training

    model = arch.build_model(cfg.model)
    params = arch.param_shapes(cfg.model) if params is None else params
    sample = jax.eval_shape(lambda: arch.sample_input(cfg.model, rows, cfg.data.seq_len + 1))
    loss = lambda p, t: training._loss_sums(model, p, t, None)[0]  # noqa: E731
    return residual_bytes(loss, params, sample)


def memory_estimate(cfg, arch=None, device_count: Optional[int] = None) -> dict[str, Any]:
    """Per-device bytes of training ``cfg`` under its architecture's sharding rules, from
    shapes alone (``jax.eval_shape``; docs/moshi.md, "Sharded runs"):

    ``params + grads + optimizer state + activations``, where params and grads (float32, one
    of each) and the optimizer state (Adam's two moments, only for params that train) are
    divided as their ``PartitionSpec`` shards them over the mesh, and activations are the saved
    residuals of one micro-batch's rows per device (``micro-batch / (data * fsdp)``) plus, with
    a rematerialised model, the working set of one layer being recomputed (as registered by the
    architecture). Activations are not divided by ``tensor`` (an upper bound there).

    Returns a dict of byte counts (``params``, ``grads``, ``optimizer``, ``activations``,
    ``total``, and ``layer``: the recomputed layer's part of the activations) with ``mesh``
    (axis sizes), ``devices`` and ``rows`` (per device).
    """
    from ttt_jax import registry

    arch = registry.of(cfg) if arch is None else arch
    n = jax.device_count() if device_count is None else device_count
    sizes = estimate_mesh_sizes(cfg.mesh, n)
    rules = rules_for(cfg.architecture)
    optimizer = arch.make_optimizer(cfg)
    state = jax.eval_shape(lambda k: arch.init_state(cfg, optimizer, k), jax.random.PRNGKey(0))
    params = sum(_per_device(x, spec_for(k, x.shape, sizes, rules), sizes)
                 for k, x in flatten(state.params).items())
    specs = flatten(opt_state_specs(state.opt_state, state.params,
                                    lambda k, shape: spec_for(k, shape, sizes, rules)))
    opt = sum(_per_device(x, specs[k], sizes) for k, x in flatten(state.opt_state).items()
              if hasattr(x, "dtype"))
    rows = cfg.data.batch_size // cfg.train.grad_accum // (sizes["data"] * sizes["fsdp"])
    working = LAYER_WORKING_SETS.get(cfg.architecture)
    working = working(cfg, rows) if working is not None else 0
    acts = activation_bytes(cfg, arch, rows, state.params) + working
    out = {"params": params, "grads": params, "optimizer": opt, "activations": acts}
    out["total"] = sum(out.values())
    out.update(mesh=sizes, devices=math.prod(sizes.values()), rows=rows, layer=working)
    return out


def describe_memory(cfg, arch=None, device_count: Optional[int] = None) -> str:
    """:func:`memory_estimate` as the lines ``train --check`` prints."""
    m = memory_estimate(cfg, arch, device_count)
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    mesh = " ".join(f"{a}={m['mesh'][a]}" for a in MESH_AXES)
    where = f"mesh {mesh} ({m['devices']} devices)" if cfg.mesh is not None else "one device"
    layer = f", {gb(m['layer'])} of it one recomputed layer" if m["layer"] else ""
    return (f"memory per device (estimate, {where}): params {gb(m['params'])} + grads "
            f"{gb(m['grads'])} + optimizer {gb(m['optimizer'])} + activations "
            f"{gb(m['activations'])} ({m['rows']} rows x {cfg.data.seq_len} positions{layer}) "
            f"= {gb(m['total'])}")
