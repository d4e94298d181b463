"""Data + FSDP (+ tensor) sharding of a training run on one ``jax.sharding.Mesh``.

JAX's SPMD compiler does all communication: this module only says where each array lives.

- The mesh has three axes, ``data``, ``fsdp`` and ``tensor`` (sizes from ``MeshConfig``).
- Batches are split along their row axis over ``data`` x ``fsdp``.
- Parameters follow the architecture's rules (:func:`rules_for`; :data:`RULES` unless the
  architecture registered its own with :func:`register_rules`), the first regex over the
  ``a/b/c`` param path that matches. With :data:`RULES`: large
  matrices are split over ``fsdp`` along their model-width dim and over ``tensor`` along their
  heads / hidden dim; per-head TTT params are split over ``tensor`` by head; everything else
  (norms, biases, convs, ``learnable_token_idx``) is replicated. A dim that the axis size does
  not divide stays whole (replicated along that axis).
- Optimizer-state leaves shaped like a param (Adam's ``mu``/``nu``) take that param's sharding;
  the rest (counters) are replicated.

A rule's template is a tuple (one mesh axis or None per leading dim) or a :class:`Split`, a
rule by shape: ``tensor`` over a named dim (heads, FFN width, vocabulary) and ``fsdp`` over the
largest dim it divides.

``Layout`` holds the mesh and these shardings, jits the init / train / eval steps with explicit
in/out shardings, and assembles each process's rows of a batch (of any trailing shape, e.g.
Moshi's frames ``[B, L+1, K]``) into global arrays. ``ttt_jax.memory.memory_estimate`` gives
the per-device bytes of a run under the rules from shapes alone (``train --check`` prints it;
docs/moshi.md, "Sharded runs").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ttt_jax.config import MESH_AXES, MeshConfig, RunConfig, check_batch_fits_mesh
from ttt_jax.distributed import read_rows
from ttt_jax.tree import flatten, path_str

# The batch (row) axis is split over both of these.
BATCH_AXES = ("data", "fsdp")

# (regex over the param path, one mesh axis or None per leading dim). Dims past the template
# and dims the axis does not divide are not split. First match wins; no match: replicated.
_HEAD_PARAMS = ("W1", "W2", "b1", "b2", "ttt_norm_weight", "ttt_norm_bias",
                "learnable_ttt_lr_weight", "learnable_ttt_lr_bias")
RULES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r"(^|/)embed_tokens/embedding$", ("tensor", "fsdp")),           # [V, d]
    (r"(^|/)lm_head/kernel$", ("fsdp", "tensor")),                   # [d, V]
    (r"/(q_proj|k_proj|v_proj|g_proj)/kernel$", ("fsdp", "tensor")),  # [d, H*f]: heads split
    (r"/o_proj/kernel$", ("tensor", "fsdp")),                        # [H*f, d]
    (r"/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),           # [d, I]
    (r"/down_proj/kernel$", ("tensor", "fsdp")),                     # [I, d]
    # Per-head TTT params [H, ...] (also under a Moshi-TTT block's ttt_layer/).
    (r"/seq_modeling_block/(ttt_layer/)?(" + "|".join(_HEAD_PARAMS) + ")$", ("tensor",)),
    # Moshi-style transformer blocks (attention in/out projections, gated FFN, output heads).
    (r"/(in_proj|linear_in)/kernel$", ("fsdp", "tensor")),           # [d, 3d] / [d, 2I]
    (r"/(out_proj|linear_out)/kernel$", ("tensor", "fsdp")),         # [d, d] / [I, d]
    (r"(^|/)linears_\d+/kernel$", ("fsdp", "tensor")),               # [d, card]
)


@dataclasses.dataclass(frozen=True)
class Split:
    """A rule by shape: ``tensor`` over dim ``tensor`` (heads, FFN width, vocabulary) when the
    tensor size divides it; then, with ``fsdp``, ``fsdp`` over the dim with the largest
    per-device extent that the fsdp size divides (the tensor dim too, as ``(tensor, fsdp)``, when
    it is the largest; never for a vector). A dim neither axis divides stays whole."""

    tensor: Optional[int] = None
    fsdp: bool = True

    def spec(self, shape: Sequence[int], mesh_shape: dict[str, int]) -> P:
        if not shape:
            return P()
        axes: list[list[str]] = [[] for _ in shape]
        local = list(shape)
        t = mesh_shape.get("tensor", 1)
        if self.tensor is not None and t > 1:
            i = self.tensor % len(shape)
            if shape[i] % t == 0:
                axes[i].append("tensor")
                local[i] //= t
        f = mesh_shape.get("fsdp", 1)
        if self.fsdp and f > 1 and len(shape) > 1:  # vectors: not worth gathering
            fits = [i for i in range(len(shape)) if local[i] % f == 0]
            if fits:
                axes[max(fits, key=lambda i: (local[i], -i))].append("fsdp")
        dims = [None if not a else a[0] if len(a) == 1 else tuple(a) for a in axes]
        while dims and dims[-1] is None:
            dims.pop()
        return P(*dims)


# Rules of the architectures that registered their own (``register_rules``).
_ARCHITECTURE_RULES: dict[str, tuple] = {}
# Per architecture that registered one: ``(run config, rows per device) -> bytes`` of the
# activations one rematerialised layer holds while its backward pass runs (ttt_jax.memory).
LAYER_WORKING_SETS: dict[str, Callable] = {}


def register_rules(architecture: str, rules, layer_working_set: Optional[Callable] = None
                   ) -> None:
    """Makes ``rules`` the param sharding rules of ``architecture`` (its mesh runs);
    ``layer_working_set(run config, rows)`` gives the bytes one rematerialised layer holds
    while recomputed (``ttt_jax.memory.memory_estimate``)."""
    _ARCHITECTURE_RULES[architecture] = tuple(rules)
    if layer_working_set is not None:
        LAYER_WORKING_SETS[architecture] = layer_working_set


def rules_for(architecture: str):
    """The param sharding rules of ``architecture`` (:data:`RULES` unless it registered its
    own); imports a built-in architecture first, so that its rules are registered."""
    from ttt_jax import registry

    registry.get(architecture)
    return _ARCHITECTURE_RULES.get(architecture, RULES)


def rule_index(path: str, rules=RULES) -> Optional[int]:
    """The index of the first rule whose regex matches ``path``, or None (replicated)."""
    for i, (pattern, _) in enumerate(rules):
        if re.search(pattern, path):
            return i
    return None


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``cfg`` over ``devices`` (all of the job's).

    With one process, a mesh smaller than the device count uses the first devices; with several
    processes it must span every device (each process drives its own).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    n = int(np.prod(list(sizes.values())))
    if n != len(devices):
        if len({d.process_index for d in devices}) > 1:
            raise ValueError(f"mesh {sizes} uses {n} of {len(devices)} devices: a multi-process "
                             f"run must use all of them (set one mesh axis to -1)")
        devices = devices[:n]
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def spec_for(path: str, shape: Sequence[int], mesh_shape: dict[str, int],
             rules=RULES) -> P:
    """The ``PartitionSpec`` of the param at ``path`` with ``shape`` on a mesh of these sizes."""
    i = rule_index(path, rules)
    if i is None:
        return P()
    template = rules[i][1]
    if isinstance(template, Split):
        return template.spec(shape, mesh_shape)
    dims = []
    for i, size in enumerate(shape):
        axis = template[i] if i < len(template) else None
        if axis is not None and (mesh_shape[axis] == 1 or size % mesh_shape[axis]):
            axis = None
        dims.append(axis)
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def opt_state_specs(opt_state, params, spec_of: Callable[[str, Sequence[int]], P]) -> Any:
    """A tree like ``opt_state`` of ``PartitionSpec``: a leaf shaped like a param whose path ends
    the leaf's path (``.../mu/<param path>``; the longest such) takes that param's spec
    ``spec_of(path, shape)``, the rest (counters) are replicated."""
    by_path = {k: (tuple(v.shape), spec_of(k, v.shape)) for k, v in flatten(params).items()}

    def one(path, leaf):
        s = path_str(path)
        matches = [key for key, (shape, _) in by_path.items()
                   if (s == key or s.endswith("/" + key)) and tuple(leaf.shape) == shape]
        return by_path[max(matches, key=len)][1] if matches else P()

    return jax.tree_util.tree_map_with_path(one, opt_state)


class Layout:
    """Where a run's state and batches live on ``mesh``, and the steps jitted accordingly.

    Args:
      mesh: a mesh with axes ``data``, ``fsdp``, ``tensor`` (see :func:`make_mesh`).
      rules: param sharding rules (defaults to :data:`RULES`; :meth:`from_config` takes the
        architecture's, :func:`rules_for`).
    """

    def __init__(self, mesh: Mesh, rules=RULES):
        self.mesh = mesh
        self.rules = rules
        self.replicated = NamedSharding(mesh, P())
        self.state_shardings = None

    @classmethod
    def from_config(cls, cfg: RunConfig, devices=None) -> "Layout":
        """The layout of ``cfg.mesh`` with the rules of ``cfg.architecture``; checks the batch
        against the resolved mesh."""
        if cfg.mesh is None:
            raise ValueError("mesh is not set: a sharded run needs a mesh section")
        mesh = make_mesh(cfg.mesh, devices)
        check_batch_fits_mesh(cfg, mesh.shape["data"], mesh.shape["fsdp"])
        return cls(mesh, rules_for(cfg.architecture))

    def param_spec(self, path: str, shape: Sequence[int]) -> P:
        return spec_for(path, shape, dict(self.mesh.shape), self.rules)

    def param_shardings(self, params) -> Any:
        """A tree like ``params`` of ``NamedSharding`` (abstract or concrete leaves)."""
        return jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(self.mesh, self.param_spec(path_str(p), x.shape)), params)

    def opt_state_shardings(self, opt_state, params) -> Any:
        """Shardings of the optimizer state: param-shaped leaves follow their param."""
        specs = opt_state_specs(opt_state, params, self.param_spec)
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                            is_leaf=lambda x: isinstance(x, P))

    def train_state_shardings(self, state) -> Any:
        """Shardings of a ``TrainState`` (abstract or concrete); a carried state
        (``TrainState.carry``, one entry per batch row) has its rows split as the batch's."""
        carry = (None if state.carry is None else
                 jax.tree.map(lambda x: self.rows_sharding(x.ndim, 0), state.carry))
        return state.replace(step=self.replicated, params=self.param_shardings(state.params),
                             opt_state=self.opt_state_shardings(state.opt_state, state.params),
                             carry=carry)

    def rows_sharding(self, ndim: int, row_axis: int) -> NamedSharding:
        """Rows (``row_axis``) split over data x fsdp, other dims whole."""
        dims = [None] * ndim
        dims[row_axis] = BATCH_AXES
        return NamedSharding(self.mesh, P(*dims))

    # ---- jitted steps -------------------------------------------------------------------

    def init_state(self, init_fn: Callable, key) -> Any:
        """``init_fn(key)`` jitted so that every leaf is created already sharded."""
        abstract = jax.eval_shape(init_fn, key)
        self.state_shardings = self.train_state_shardings(abstract)
        return jax.jit(init_fn, out_shardings=self.state_shardings)(key)

    def place_state(self, state) -> Any:
        """Moves a (host or single-device) ``TrainState`` onto the mesh."""
        if self.state_shardings is None:
            self.state_shardings = self.train_state_shardings(state)
        # Via host memory: the same values on every process, whatever device they were on.
        return jax.device_put(jax.tree.map(np.asarray, state), self.state_shardings)

    def jit_train_step(self, train_step: Callable, state) -> Callable:
        """``train_step(state, tokens [k, m, L+1, ...], mask)`` with state donated and kept
        sharded (rows ``m`` split; trailing dims, e.g. Moshi's streams, whole)."""
        shardings = (self.state_shardings if self.state_shardings is not None
                     else self.train_state_shardings(state))
        rows = self.rows_sharding(3, 1)
        jitted = jax.jit(train_step, donate_argnums=0,
                         in_shardings=(shardings, rows, rows),
                         out_shardings=(shardings, self.replicated))
        return jitted

    def jit_eval_step(self, eval_step: Callable, params) -> Callable:
        """``eval_step(params, tokens [B, L+1], mask)`` returning replicated sums."""
        rows = self.rows_sharding(2, 0)
        return jax.jit(eval_step, in_shardings=(self.param_shardings(params), rows, rows),
                       out_shardings=self.replicated)

    # ---- batches ------------------------------------------------------------------------

    def local_rows(self, num_rows: int) -> tuple[int, int]:
        """``[lo, hi)``: the rows of a ``num_rows`` batch this process's devices hold."""
        sharding = self.rows_sharding(1, 0)
        me = jax.process_index()
        spans = sorted({(idx[0].start or 0, num_rows if idx[0].stop is None else idx[0].stop)
                        for d, idx in sharding.devices_indices_map((num_rows,)).items()
                        if d.process_index == me})
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start != end:
                raise ValueError(f"process {me} holds non-contiguous batch rows {spans}: the "
                                 f"mesh's device order does not group this host's devices")
        return spans[0][0], spans[-1][1]

    def _global(self, local: Optional[np.ndarray], sharding, global_shape) -> Optional[jax.Array]:
        if local is None:
            return None
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def train_batch(self, ds, step: int, accum: int):
        """Global ``(tokens [k, m, L+1], mask [k, m, L] or None)`` of optimizer step ``step``.

        Same values as ``trainer._micro_batches``; this process reads only its own rows of
        every micro-batch.
        """
        m = ds.batch_size // accum
        lo, hi = self.local_rows(m)
        rows = (np.arange(accum)[:, None] * m + np.arange(lo, hi)[None]).reshape(-1)
        tokens, mask = read_rows(ds, step, rows)
        sharding = self.rows_sharding(3, 1)
        tokens = self._global(tokens.reshape(accum, hi - lo, *tokens.shape[1:]), sharding,
                              (accum, m) + tokens.shape[1:])
        if mask is not None:
            mask = self._global(mask.reshape(accum, hi - lo, *mask.shape[1:]), sharding,
                                (accum, m) + mask.shape[1:])
        return tokens, mask

    def eval_view(self, ds) -> "ShardedData":
        """``ds`` whose ``batch(i)`` / ``loss_mask(i)`` are global arrays (for ``evaluate``)."""
        return ShardedData(ds, self)


class ShardedData:
    """A dataset view returning global, row-sharded ``jax.Array`` batches built per process."""

    def __init__(self, ds, layout: Layout):
        self.ds, self.layout = ds, layout
        self._cache: tuple[int, Any] | None = None

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def _load(self, step: int):
        if self._cache is None or self._cache[0] != step:
            b = self.ds.batch_size
            lo, hi = self.layout.local_rows(b)
            tokens, mask = read_rows(self.ds, step, np.arange(lo, hi))
            sharding = self.layout.rows_sharding(2, 0)
            tokens = self.layout._global(tokens, sharding, (b,) + tokens.shape[1:])
            if mask is not None:
                mask = self.layout._global(mask, sharding, (b,) + mask.shape[1:])
            self._cache = (step, (tokens, mask))
        return self._cache[1]

    def batch(self, step: int) -> jax.Array:
        return self._load(step)[0]

    def loss_mask(self, step: int) -> Optional[jax.Array]:
        return self._load(step)[1]
