"""ttt-jax against the official JAX implementation (test-time-training/ttt-lm-jax), side by side.

Layers: the official ``TTTLinearBase`` / ``TTTMLPBase`` (``ttt/models/ttt_layer.py``; separate
Q/K/V projections, no gate, interleaved RoPE over ``position % b``, no Q/K L2 norm, inner steps
rematerialised in groups of ``remat_mini_batch_group_size``) against ``ttt_jax.TTTLayer`` with
the same switches (``use_rope: true``, ``rope_layout: interleaved``, ``share_qk: false``,
``use_gate: false``, ``qk_l2_norm: false``; ``scan_checkpoint_group`` from ``--group``, by
default our own, chosen for least memory; the official layer's groups are 4). Both get the
same params: ours are initialised and mapped onto the official tree (every leaf mapped, shapes checked), and the outputs must agree
(``max_abs_diff`` in each ``result`` line; the run fails if it exceeds ``--atol``).

Model: one training step (``value_and_grad`` of the mean next-token cross-entropy, an
``optax.adamw`` update) of a small LM, 2 blocks, ``d = 512``, ``H = 8``, ``b = 16``, vocab 32000,
sequence 2048, tied embeddings, no pre-conv: the official ``CausalLM`` (``ttt/models/model.py``,
``seq_modeling_block: ttt_linear_base`` / ``ttt_mlp_base``, its default remat: none on blocks,
inner groups of 4) with the cross-entropy of its logits, against ``ttt_jax.models.TTTLM`` with
its defaults and its own training loss (``ttt_jax.training``: the LM head inside the
cross-entropy, ``ModelConfig.loss_chunk`` tokens at a time), the same params (mapped, logits
and loss checked). ``--donate`` donates the params and optimizer state to the step, as both
trainers do; the step then runs on the state it returned, and the loss check is of the first
step.

Timing: every function is compiled first; then the two implementations run alternately,
``--repeats`` samples each (after ``--warmup`` untimed runs), and the medians are compared, so a
busy machine slows both alike. A sample repeats a call back to back until it lasts about
``--min-sample-s`` (0.25 s; the count is ``calls_per_sample``), so a forward of a few ms is
timed over tens of calls rather than one. ``ratio = ours tokens/s / official tokens/s``
(> 1: ours is faster). Memory: ``peak_bytes`` = argument + output + temp bytes from the
compiled executable's ``memory_analysis()`` (what XLA plans to allocate; the same measure for
both).

Floor: every row also times, in the same alternation, the products that both implementations
must run whatever their TTT inner loop costs: for a layer its four ``d x d`` projections (Q, K,
V, O) on the same input, for the training step the same model with the TTT inner loop taken
out (embeddings, norms, the four projections and the SwiGLU MLP of each block, the tied LM head
fused with the loss as ours, and the optimizer update). ``ratio_bound = official time / floor time`` is the ratio
ours would reach if its whole TTT-specific part (inner loop, RoPE, the inner LayerNorm, the
learning-rate gate, the output norm) took no time at all.

Output: JSON lines on stdout (and appended to ``--out``): a ``header``, one ``result`` per
(type, mode, L) and per model step.

Dependencies: only what ttt-jax already needs. The official files import packages that the
layer and the model do not use on this path (``ttt/infra/jax_utils.py``: torch, transformers,
wandb, PIL, matplotlib, ml_collections; ``ttt/models/model.py``: transformers, ml_collections,
mlxu; ``ttt/models/bpt.py``: einops). Each one that is missing is replaced in-process
(``sys.modules``) by a stub module with the few names the import statements need; the stubs are
never called on the benchmarked path except ``with_sharding_constraint`` (identity: there is no
mesh) and ``get_gradient_checkpoint_policy`` (``jax.checkpoint_policies`` by name). One shim for the
jax of ttt-jax: the official modules' ``jnp`` is replaced by a proxy of ``jax.numpy`` whose
``clip`` also accepts the ``a_min``/``a_max`` keywords that jax 0.4 had. Installing
the real packages (``pip install transformers mlxu ml_collections einops wandb``) also works; the
stubs are then unused. Nothing here becomes a dependency of ttt-jax. The official code is only
imported from ``--ttt-lm-jax``, never copied.

Usage (from the repository root)::

  python benchmarks/bench_vs_ttt_lm_jax.py --ttt-lm-jax /path/to/ttt-lm-jax
  python benchmarks/bench_vs_ttt_lm_jax.py --ttt-lm-jax DIR --only linear --lengths 2048 --repeats 5
  python benchmarks/bench_vs_ttt_lm_jax.py --ttt-lm-jax DIR --no-layers      # model step only
  python benchmarks/bench_vs_ttt_lm_jax.py --ttt-lm-jax DIR --no-layers --donate
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.bench_layer import emit, header, peak_bytes  # noqa: E402
from ttt_jax import TTTConfig, TTTLayer, training  # noqa: E402
from ttt_jax.config import ModelConfig  # noqa: E402
from ttt_jax.math.cross_entropy import fused_cross_entropy  # noqa: E402
from ttt_jax.models.ttt_lm import TTTLM  # noqa: E402

BENCH = "vs_ttt_lm_jax"
TYPES = ("linear", "mlp")
MODES = ("fwd", "fwd_bwd")


# --- Importing the official code -------------------------------------------------------------

def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__ttt_jax_stub__ = True
    return mod


def _unused(name: str) -> Callable:
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a benchmark stub (the real package is not installed)")
    return fail


class _PretrainedConfig:
    """Stands in for ``transformers.PretrainedConfig``: keyword arguments become attributes."""

    def __init__(self, **kwargs):
        for key, value in kwargs.items():
            setattr(self, key, value)


class _ModelOutput:
    """Stands in for ``transformers.modeling_flax_outputs.ModelOutput`` (a dataclass base).

    Indexing by position reads the fields that are not None, in order, as transformers does.
    """

    def __getitem__(self, k):
        if isinstance(k, str):
            return getattr(self, k)
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return tuple(v for v in values if v is not None)[k]


def _stub_jax_utils() -> types.ModuleType:
    names = ("JaxRNG", "JaxDistributedConfig", "get_jax_mesh", "set_random_seed", "next_rng",
             "init_rng", "get_metrics", "cross_entropy_loss_and_accuracy", "global_norm",
             "average_metrics", "get_float_dtype_by_name", "float_to_dtype",
             "make_shard_and_gather_fns", "match_partition_rules", "tree_apply")
    return _module("ttt.infra.jax_utils",
                   with_sharding_constraint=lambda x, spec: x,
                   get_gradient_checkpoint_policy=lambda n: getattr(jax.checkpoint_policies, n),
                   **{n: _unused(n) for n in names})


def _stubs() -> dict[str, Callable[[], types.ModuleType]]:
    """Stub factories by the module name that the official imports need."""
    return {
        "transformers": lambda: _module("transformers"),
        "transformers.configuration_utils": lambda: _module(
            "transformers.configuration_utils", PretrainedConfig=_PretrainedConfig),
        "transformers.modeling_flax_outputs": lambda: _module(
            "transformers.modeling_flax_outputs", ModelOutput=_ModelOutput),
        "ml_collections": lambda: _module("ml_collections", ConfigDict=dict),
        "mlxu": lambda: _module("mlxu", function_args_to_config=_unused("function_args_to_config"),
                                load_pickle=_unused("load_pickle"), open_file=_unused("open_file")),
        "einops": lambda: _module("einops", rearrange=_unused("rearrange")),
    }


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the stub
        return False


def import_official(root: str) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """Imports ``ttt.models.ttt_layer`` and ``ttt.models.model`` from ``root``.

    Returns:
      ``(ttt_layer, model, stubbed)``: the two modules and the names of the stubbed modules.
    """
    root = str(Path(root).resolve())
    if not (Path(root) / "ttt" / "models" / "ttt_layer.py").is_file():
        raise SystemExit(f"--ttt-lm-jax {root}: no ttt/models/ttt_layer.py there")
    sys.path.insert(0, root)
    stubbed = []
    for name, make in _stubs().items():
        if name not in sys.modules and not _importable(name):
            sys.modules[name] = make()
            stubbed.append(name)
    if not _importable("ttt.infra.jax_utils"):
        sys.modules.pop("ttt.infra.jax_utils", None)
        importlib.import_module("ttt.infra")
        sys.modules["ttt.infra.jax_utils"] = _stub_jax_utils()
        stubbed.append("ttt.infra.jax_utils")
    layer_mod = importlib.import_module("ttt.models.ttt_layer")
    model_mod = importlib.import_module("ttt.models.model")
    for mod in (layer_mod, model_mod):  # jax >= 0.7 dropped jnp.clip(a_min=, a_max=)
        mod.jnp = _JnpCompat()
    return layer_mod, model_mod, stubbed


class _JnpCompat(types.ModuleType):
    """``jax.numpy`` whose ``clip`` also takes the ``a_min``/``a_max`` keywords of jax 0.4."""

    def __init__(self):
        super().__init__("jax.numpy")

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def clip(x, min=None, max=None, *, a_min=None, a_max=None):  # noqa: A002
        return jnp.clip(x, a_min if min is None else min, a_max if max is None else max)


# --- Configs and the param mapping ------------------------------------------------------------

def our_ttt_config(args, layer_type: str, group: int) -> TTTConfig:
    return TTTConfig(model_dim=args.dim, num_heads=args.heads, mini_batch_size=args.mini_batch,
                     ttt_layer_type=layer_type, use_rope=True, rope_layout="interleaved",
                     qk_l2_norm=False, share_qk=False, use_gate=False,
                     scan_checkpoint_group=group)


def official_layer_config(args, length: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        hidden_size=args.dim, num_attention_heads=args.heads, mini_batch_size=args.mini_batch,
        max_sequence_length=length, rope_theta=10000.0, initializer_range=0.02, ttt_base_lr=1.0,
        remat_mini_batch_group_size=args.official_group, output_ttt_stats=False, remat_conv="")


def _layer_map(ours: dict) -> dict[str, jax.Array]:
    """Our TTTLayer params -> the official layer's flat params ``{"a/b": array}``."""
    out = {
        "wq/kernel": ours["q_proj"]["kernel"], "wk/kernel": ours["k_proj"]["kernel"],
        "wv/kernel": ours["v_proj"]["kernel"], "wo/kernel": ours["o_proj"]["kernel"],
        "learnable_token_idx": ours["learnable_token_idx"],
        "learnable_ttt_lr/kernel": ours["learnable_ttt_lr_weight"][..., None],
        "learnable_ttt_lr/bias": ours["learnable_ttt_lr_bias"][:, None],
        "ttt_norm/scale": ours["ttt_norm_weight"], "ttt_norm/bias": ours["ttt_norm_bias"],
        "post_norm/scale": ours["post_norm"]["scale"], "post_norm/bias": ours["post_norm"]["bias"],
        "ttt_dense_0": ours["W1"], "ttt_bias_0": ours["b1"],
    }
    if "W2" in ours:
        out.update({"ttt_dense_1": ours["W2"], "ttt_bias_1": ours["b2"]})
    return out


def fill(template: dict, flat_values: dict[str, jax.Array]) -> dict:
    """The official param tree ``template`` with every leaf taken from ``flat_values``."""
    # Some official param names contain "/" themselves: keep the tree's own key tuples.
    keys = {"/".join(k): k for k in flax.traverse_util.flatten_dict(template)}
    flat = {name: leaf for name, leaf in zip(
        keys, flax.traverse_util.flatten_dict(template).values())}
    missing = sorted(set(flat) - set(flat_values))
    unused = sorted(set(flat_values) - set(flat))
    if missing or unused:
        raise SystemExit(f"param mapping: official leaves not mapped {missing}, "
                         f"mapped names not in the official tree {unused}")
    for key, leaf in flat.items():
        if tuple(flat_values[key].shape) != tuple(leaf.shape):
            raise SystemExit(f"param mapping: {key} has shape {leaf.shape} officially, "
                             f"{flat_values[key].shape} mapped")
    return flax.traverse_util.unflatten_dict(
        {keys[k]: jnp.asarray(flat_values[k], leaf.dtype) for k, leaf in flat.items()})


def _model_map(ours: dict, num_layers: int) -> dict[str, jax.Array]:
    out = {"model/wte/embedding": ours["embed_tokens"]["embedding"],
           "model/ln_f/kernel": ours["norm"]["weight"]}
    for i in range(num_layers):
        blk = ours[f"layers_{i}"]
        pre = f"model/h/{i}/"
        out[pre + "seq_norm/kernel"] = blk["seq_norm"]["weight"]
        out[pre + "ffn_norm/kernel"] = blk["ffn_norm"]["weight"]
        out[pre + "feed_forward/w1/kernel"] = blk["mlp"]["gate_proj"]["kernel"]
        out[pre + "feed_forward/w3/kernel"] = blk["mlp"]["up_proj"]["kernel"]
        out[pre + "feed_forward/w2/kernel"] = blk["mlp"]["down_proj"]["kernel"]
        for key, value in _layer_map(blk["seq_modeling_block"]).items():
            out[pre + "seq_modeling_block/" + key] = value
    return out


# --- Timing ------------------------------------------------------------------------------------

def compile_fn(fn: Callable, args: tuple, donate: tuple[int, ...] = ()):
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_pair(fns: dict[str, Any], args: dict[str, tuple], repeats: int, warmup: int,
              min_sample_s: float = 0.0, feed: Optional[Callable[[tuple, Any], tuple]] = None):
    """Runs the compiled functions alternately; returns per-impl times (seconds per call) and
    last outputs. A sample of a function runs it back to back (each call waited for) as many
    times as the warm-up says it takes to fill ``min_sample_s``, so that a call of a few ms is
    not one scheduler tick away from a different figure; the count per sample is returned too.
    With ``feed``, each call's arguments are ``feed(previous arguments, previous output)`` (a
    training step whose state is donated runs on the state it returned).
    """
    args = dict(args)
    outs, last = {}, {}

    def call(name):
        out = jax.block_until_ready(fns[name](*args[name]))
        if feed is not None:
            args[name] = feed(args[name], out)
        return out

    for _ in range(warmup):
        for name in fns:
            outs[name] = call(name)
    for name in fns:  # one more call each, timed, to size the samples
        t0 = time.perf_counter()
        outs[name] = call(name)
        last[name] = time.perf_counter() - t0
    calls = {name: max(1, math.ceil(min_sample_s / max(last[name], 1e-6))) for name in fns}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name in fns:
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                outs[name] = call(name)
            times[name].append((time.perf_counter() - t0) / calls[name])
    return times, outs, calls


def _record(kind: str, tokens: int, times: dict, compiled: dict, compile_s: dict, **extra):
    rec = {"bench": BENCH, "kind": kind, **extra}
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("ours", "official"):
        rec[f"{name}_tokens_per_s"] = tokens / med[name]
        rec[f"{name}_median_s"] = med[name]
        rec[f"{name}_min_s"] = min(times[name])
        rec[f"{name}_compile_s"] = compile_s[name]
        rec[f"{name}_peak_bytes"] = peak_bytes(compiled[name])
    rec["ratio"] = med["official"] / med["ours"]
    if rec["ours_peak_bytes"] and rec["official_peak_bytes"]:
        rec["memory_ratio"] = rec["ours_peak_bytes"] / rec["official_peak_bytes"]
    if "floor" in times:
        rec["floor_median_s"] = med["floor"]
        rec["floor_peak_bytes"] = peak_bytes(compiled["floor"])
        rec["ratio_bound"] = med["official"] / med["floor"]
    rec["repeats"] = len(times["ours"])
    return rec


def _max_abs(a, b) -> float:
    return float(max(jax.tree.leaves(jax.tree.map(
        lambda u, v: jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))),
        a, b))))


# --- The layer ---------------------------------------------------------------------------------

def floor_layer(p, x):
    """The four projections of a layer, nothing else (each one feeds the output)."""
    q, k, v = (x @ p[name] for name in ("q_proj", "k_proj", "v_proj"))
    return (q + k + v) @ p["o_proj"]



def bench_layer(official_mod, layer_type: str, length: int, args) -> None:
    cfg = our_ttt_config(args, layer_type, args.group)
    ours = TTTLayer(cfg)
    cls = official_mod.TTTLinearBase if layer_type == "linear" else official_mod.TTTMLPBase
    theirs = cls(official_layer_config(args, length))
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed), length)
    k_init, k_x = jax.random.split(key)
    x = jax.random.normal(k_x, (args.batch, length, args.dim), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (args.batch, length))
    p_ours = jax.jit(ours.init)(k_init, x[:, : args.mini_batch])["params"]
    template = jax.eval_shape(lambda: theirs.init(k_init, x, None, pos))["params"]
    p_theirs = fill(template, _layer_map(p_ours))

    def fwd_ours(p, x):
        return ours.apply({"params": p}, x)

    def fwd_theirs(p, x):
        return theirs.apply({"params": p}, x, None, pos)[0]

    def with_grad(fwd):
        loss = lambda p, x: jnp.mean(jnp.square(fwd(p, x)))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))

    p_floor = {k: p_ours[k]["kernel"] for k in ("q_proj", "k_proj", "v_proj", "o_proj")}

    for mode in args.modes:
        fns = {"ours": fwd_ours, "official": fwd_theirs, "floor": floor_layer}
        if mode == "fwd_bwd":
            fns = {k: with_grad(f) for k, f in fns.items()}
        call_args = {"ours": (p_ours, x), "official": (p_theirs, x), "floor": (p_floor, x)}
        compiled, compile_s = {}, {}
        for name in fns:
            compiled[name], compile_s[name] = compile_fn(fns[name], call_args[name])
        times, outs, calls = time_pair(compiled, call_args, args.repeats, args.warmup,
                                       args.min_sample_s)
        if mode == "fwd":
            diff = _max_abs(outs["ours"], outs["official"])
        else:  # the loss and the input gradient (param trees differ in layout)
            diff = max(_max_abs(outs["ours"][0], outs["official"][0]),
                       _max_abs(outs["ours"][1][1], outs["official"][1][1]))
        rec = _record("result", args.batch * length, times, compiled, compile_s,
                      what="layer", ttt_layer_type=layer_type, mode=mode, L=length, B=args.batch,
                      d=args.dim, H=args.heads, b=args.mini_batch, ours_group=args.group,
                      official_group=args.official_group, max_abs_diff=diff,
                      calls_per_sample=calls)
        emit(rec, args.out)
        if diff > args.atol:
            raise SystemExit(f"outputs disagree: max abs diff {diff:.3g} > --atol {args.atol}")


# --- The model's training step ------------------------------------------------------------------

def _rms(x, w, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * w


def floor_lm(p: dict, tokens, num_layers: int):
    """Our LM's final hidden states with the TTT inner loop taken out (the head and the loss
    follow in ``bench_model``): what any implementation must run."""
    emb = p["embed_tokens"]["embedding"]
    h = emb[tokens]
    for i in range(num_layers):
        blk = p[f"layers_{i}"]
        proj = {k: v["kernel"] for k, v in blk["seq_modeling_block"].items()
                if k in ("q_proj", "k_proj", "v_proj", "o_proj")}
        h = h + floor_layer(proj, _rms(h, blk["seq_norm"]["weight"]))
        m, mlp = _rms(h, blk["ffn_norm"]["weight"]), blk["mlp"]
        gate, up = m @ mlp["gate_proj"]["kernel"], m @ mlp["up_proj"]["kernel"]
        h = h + (jax.nn.silu(gate) * up) @ mlp["down_proj"]["kernel"]
    return _rms(h, p["norm"]["weight"])


def _next_state(step_args: tuple, out: tuple) -> tuple:
    """The next step's arguments: the params and optimizer state the step returned."""
    return out[0], out[1], step_args[2]


def bench_model(model_mod, layer_type: str, args) -> None:
    length, vocab, layers = args.model_len, args.vocab, args.model_layers
    ttt = our_ttt_config(args, layer_type, TTTConfig.scan_checkpoint_group)  # our default
    ours = TTTLM(ModelConfig(vocab_size=vocab, num_layers=layers,
                             intermediate_size=args.intermediate, ttt=ttt, pre_conv=False,
                             tie_word_embeddings=True))
    cfg = model_mod.ModelConfig(
        vocab_size=vocab, hidden_size=args.dim, intermediate_size=args.intermediate,
        num_hidden_layers=layers, num_attention_heads=args.heads, max_sequence_length=length,
        tie_word_embeddings=True, seq_modeling_block=f"ttt_{layer_type}_base",
        mini_batch_size=args.mini_batch, remat_mini_batch_group_size=args.official_group,
        ttt_base_lr=1.0, rope_theta=10000.0, pre_conv=False, conv_width=4)
    theirs = model_mod.CausalLM(cfg)
    key = jax.random.PRNGKey(args.seed)
    k_init, k_tok = jax.random.split(key)
    tokens = jax.random.randint(k_tok, (args.batch, length + 1), 0, vocab, jnp.int32)
    p_ours = jax.jit(ours.init)(k_init, tokens[:, : args.mini_batch])["params"]
    template = jax.eval_shape(lambda: theirs.init(k_init, tokens[:, :length]))["params"]
    p_theirs = fill(template, _model_map(p_ours, layers))

    def logits_ours(p, t):
        return ours.apply({"params": p}, t)

    def logits_theirs(p, t):
        return theirs.apply({"params": p}, t, return_dict=False)[0]

    opt = optax.adamw(1e-3, weight_decay=0.1)

    def loss_ours(p, tok):  # our training loss: the LM head inside it (ModelConfig.loss_chunk)
        total, count = training._loss_sums(ours, p, tok, None)
        return total / count

    def loss_theirs(p, tok):  # the official's: the cross-entropy of its logits
        logits = logits_theirs(p, tok[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

    def loss_floor(p, tok):  # the cheaper of the two heads, as ours
        h = floor_lm(p, tok[:, :-1], layers)
        total, count = fused_cross_entropy(h.reshape(-1, h.shape[-1]),
                                           p["embed_tokens"]["embedding"],
                                           tok[:, 1:].reshape(-1))
        return total / count

    def make_step(loss):
        def step(p, opt_state, tok):
            value, grads = jax.value_and_grad(loss)(p, tok)
            updates, opt_state = opt.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, value
        return step

    check = {"ours": jax.jit(logits_ours)(p_ours, tokens[:, :length]),
             "official": jax.jit(logits_theirs)(p_theirs, tokens[:, :length])}
    diff = _max_abs(check["ours"], check["official"])
    del check
    fns = {"ours": make_step(loss_ours), "official": make_step(loss_theirs),
           "floor": make_step(loss_floor)}
    params = {"ours": p_ours, "official": p_theirs, "floor": p_ours}
    # each gets its own copy: a donated state is consumed by the step
    fresh = {name: lambda p=p: (jax.tree.map(jnp.copy, p), opt.init(p), tokens)
             for name, p in params.items()}
    donate = (0, 1) if args.donate else ()
    compiled, compile_s = {}, {}
    for name in fns:
        compiled[name], compile_s[name] = compile_fn(fns[name], fresh[name](), donate)
    # the first step of each from the same params: the losses must agree
    first = {name: compiled[name](*fresh[name]())[2] for name in ("ours", "official")}
    diff = max(diff, abs(float(first["ours"]) - float(first["official"])))
    call_args = {name: fresh[name]() for name in fns}
    times, outs, calls = time_pair(compiled, call_args, args.model_repeats, args.warmup,
                                   args.min_sample_s,
                                   feed=_next_state if args.donate else None)
    rec = _record("result", args.batch * length, times, compiled, compile_s,
                  what="train_step", ttt_layer_type=layer_type, mode="train_step", L=length,
                  B=args.batch, d=args.dim, H=args.heads, b=args.mini_batch, layers=layers,
                  vocab=vocab, intermediate=args.intermediate, ours_group=ttt.scan_checkpoint_group,
                  official_group=args.official_group, ours_loss_chunk=ours.config.loss_chunk,
                  max_abs_diff=diff, calls_per_sample=calls, donated=args.donate)
    emit(rec, args.out)
    if diff > args.atol:
        raise SystemExit(f"logits disagree: max abs diff {diff:.3g} > --atol {args.atol}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ttt-lm-jax", required=True, metavar="DIR",
                   help="a checkout of test-time-training/ttt-lm-jax")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--only", choices=TYPES, help="one inner model only")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-sample-s", type=float, default=0.25,
                   help="each timed sample repeats a call until it lasts about this long")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--group", type=int, default=None,
                   help="our scan_checkpoint_group in the layer runs (default: ours, chosen "
                        "for least memory; the value makes no difference to the recomputation)")
    p.add_argument("--official-group", type=int, default=4,
                   help="the official remat_mini_batch_group_size (default 4)")
    p.add_argument("--no-layers", action="store_true", help="skip the layer runs")
    p.add_argument("--no-model", action="store_true", help="skip the model step")
    p.add_argument("--model-len", type=int, default=2048)
    p.add_argument("--model-layers", type=int, default=2)
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--donate", action="store_true",
                   help="donate the training step's params and optimizer state to it, as both "
                        "trainers do (each step then runs on the state the previous one "
                        "returned)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--atol", type=float, default=1e-3,
                   help="fail when ours and the official outputs differ by more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append the JSON lines to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    layer_mod, model_mod, stubbed = import_official(args.ttt_lm_jax)
    head = header(args, BENCH)
    head["stubbed_modules"] = stubbed
    emit(head, args.out)
    types_ = [args.only] if args.only else list(TYPES)
    if not args.no_layers:
        for layer_type in types_:
            for length in args.lengths:
                bench_layer(layer_mod, layer_type, length, args)
    if not args.no_model:
        for layer_type in types_:
            bench_model(model_mod, layer_type, args)


if __name__ == "__main__":
    main()
