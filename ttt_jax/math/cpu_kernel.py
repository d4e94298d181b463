"""The dual-form scan of both inner models as one native call on the CPU (docs/architecture.md §1.6).

XLA runs the scan of ``ttt_scan.py`` as a loop of a few dozen small ops per mini-batch, and on
the CPU each op costs microseconds of dispatch besides its arithmetic. ``csrc/ttt_cpu.cc``
computes the same function in one call: one chain per (batch element, head), whose inner
weights stay in the core's cache for the whole sequence, the chains spread over the cores.
Its derivative is a second call that keeps the state every ``group`` mini-batches and
recomputes the rest, as ``scan_tokens``' does. ``scan`` is ``scan_tokens`` for one inner layer
(TTT-Linear) or two (TTT-MLP). The same library holds the LM head's softmax pass
(``csrc/xent_cpu.cc``, called by ``cross_entropy.fused_cross_entropy``).

The sources are compiled on first use with the machine's C++ compiler (``$CXX``, else ``g++``)
for the machine's own instruction set, into ``$TTT_JAX_KERNEL_CACHE`` (default
``~/.cache/ttt_jax/kernels``), keyed by the sources, the compiler command, jax's version and
the CPU. ``TTT_JAX_CPU_KERNEL``: ``0`` never uses it; ``1`` requires it (an error when it
cannot be built); unset, it is used when it builds, with a warning once when it does not.
It serves one or two inner layers of float32 weights on a single CPU device; everything else
runs the XLA scan. A call shares its work with XLA's own intra-op threads (``csrc/parallel.h``:
the FFI's thread pool, no threads of its own); ``TTT_JAX_CPU_THREADS`` sets how many take part
(default: the CPUs this process may run on, fewer for small problems: ``threads``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ENV = "TTT_JAX_CPU_KERNEL"
SOURCE = Path(__file__).parent / "csrc" / "ttt_cpu.cc"
# Compiled into the same library: the LM head's softmax pass (``cross_entropy.py``); both
# include ``simd.h``.
SOURCES = (SOURCE, SOURCE.with_name("xent_cpu.cc"))
_HEADERS = (SOURCE.with_name("simd.h"), SOURCE.with_name("parallel.h"))
# Per number of inner layers: the FFI targets of the forward and the derivative, and the
# library's symbol of each.
_TARGETS = {1: ("ttt_jax_linear_forward", "ttt_jax_linear_backward"),
            2: ("ttt_jax_mlp_forward", "ttt_jax_mlp_backward")}
_SYMBOLS = {"ttt_jax_linear_forward": "TttLinearForward",
            "ttt_jax_linear_backward": "TttLinearBackward",
            "ttt_jax_mlp_forward": "TttMlpForward", "ttt_jax_mlp_backward": "TttMlpBackward",
            "ttt_jax_softmax_xent": "TttSoftmaxXent"}

_lock = threading.Lock()
_loaded: dict = {}  # "lib" or "error" once a build was tried
_off = threading.local()


class KernelUnavailable(RuntimeError):
    """The native kernel could not be built or loaded (the message says why)."""


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "g++"))


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC",
            "-I", jax.ffi.include_dir()]


def _cpu_tag() -> str:
    """What the machine code depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("TTT_JAX_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ttt_jax" / "kernels"


def build() -> Path:
    """Compiles the kernel unless a build for this source, compiler and CPU is cached.

    Returns the shared library's path. The library appears under its final name only when
    complete (written beside it, then renamed), so concurrent builds cannot load half a file.
    Raises ``KernelUnavailable`` with the compiler's message when the build fails.
    """
    cmd = _compiler() + _flags()
    key = hashlib.sha256()
    for part in (*(src.read_bytes() for src in SOURCES + _HEADERS), " ".join(cmd).encode(),
                 jax.__version__.encode(), _cpu_tag().encode()):
        key.update(part)
    out = cache_dir() / f"ttt_cpu-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(cmd + [str(src) for src in SOURCES] + ["-o", tmp, "-lpthread"],
                              capture_output=True, text=True)
        if proc.returncode:
            names = ", ".join(src.name for src in SOURCES)
            raise KernelUnavailable(f"compiling {names} failed ({' '.join(cmd[:1])} exit "
                                    f"status {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    except FileNotFoundError as err:
        raise KernelUnavailable(f"no C++ compiler {cmd[0]!r} (set CXX): {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load():
    """Builds (once per process), loads and registers the kernel; raises ``KernelUnavailable``."""
    with _lock:
        if "lib" not in _loaded and "error" not in _loaded:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build()))
                for target, symbol in _SYMBOLS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                platform="cpu")
                _loaded["lib"] = lib
            except (KernelUnavailable, OSError) as err:
                _loaded["error"] = err
        if "error" in _loaded:
            err = _loaded["error"]
            raise err if isinstance(err, KernelUnavailable) else KernelUnavailable(str(err))
        return _loaded["lib"]


@contextlib.contextmanager
def disabled():
    """Within this context (this thread), ``use_kernel`` is False: traces get the XLA scan."""
    depth = getattr(_off, "depth", 0)
    _off.depth = depth + 1
    try:
        yield
    finally:
        _off.depth = depth


def use_kernel(state) -> bool:
    """Whether the scan of ``state`` (a tuple of ``(W, bias)`` layers) runs in the kernel.

    One inner layer (TTT-Linear) or two (TTT-MLP) of float32 weights, and ``available()``.
    """
    if len(state) not in (1, 2):
        return False
    if any(jnp.result_type(a) != jnp.float32 for a in jax.tree.leaves(state)):
        return False
    return available()


def available() -> bool:
    """Whether the native library runs here: the CPU backend with a single device,
    ``TTT_JAX_CPU_KERNEL`` not ``0``, outside ``disabled()``, and the library built (with
    ``TTT_JAX_CPU_KERNEL=1`` a failed build raises; unset, it warns once)."""
    mode = os.environ.get(ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"{ENV}={mode!r}: expected 0 (off), 1 (required) or unset (auto)")
    if mode == "0" or getattr(_off, "depth", 0):
        return False
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    try:
        load()
    except KernelUnavailable as err:
        if mode == "1":
            raise
        if not _loaded.get("warned"):
            _loaded["warned"] = True
            warnings.warn(f"the TTT CPU kernel is unavailable, using XLA's ops ({err}); "
                          f"{ENV}=0 silences this", RuntimeWarning, stacklevel=2)
        return False
    return True


# Below this many multiply-adds of one product per mini-batch summed over the sequence and the
# chains (``n * B * H * b * sum(f_in * f_out)``), one thread: starting a second costs more
# than it saves (at d=32, H=2, L=13 two threads ran the layer 0.4-0.6x as fast as one).
_MIN_WORK_PER_THREAD = 1 << 20


def threads(work: int, min_work_per_thread: int) -> int:
    """Threads for one native call: ``TTT_JAX_CPU_THREADS``, else the CPUs this process may
    use, at most one per ``min_work_per_thread`` of ``work``."""
    env = os.environ.get("TTT_JAX_CPU_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"TTT_JAX_CPU_THREADS={env!r}: expected a positive integer")
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, work // min_work_per_thread))


def _threads(xs, state_leaves) -> int:
    """``threads`` of the scan (``xs``: the token-major inputs)."""
    bsz, n, b, heads, _ = xs[0].shape
    weights = sum(a.shape[-2] * a.shape[-1] for a in state_leaves)  # the W of each layer
    return threads(n * bsz * heads * b * weights, _MIN_WORK_PER_THREAD)


def _spec(shape):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _leaves(state):
    return [a for layer in state for a in layer]


def _layers(leaves):
    """The inverse of ``_leaves``: ``(W, bias)`` pairs."""
    return tuple(zip(leaves[0::2], leaves[1::2]))


def _forward(state, xs, tok, ln_weight, ln_bias, group):
    """The kernel's forward: the end state, ``z_bar`` and the state at every ``group``-th
    mini-batch (stacked on a leading axis)."""
    leaves = _leaves(state)
    ng = -(-xs[0].shape[1] // group)
    out = (*(_spec(a.shape) for a in leaves), _spec(xs[0].shape),
           *(_spec((ng, *a.shape)) for a in leaves))
    call = jax.ffi.ffi_call(_TARGETS[len(state)][0], out, vmap_method="sequential")
    res = call(*_f32(*leaves, *xs, tok, ln_weight, ln_bias), group=np.int64(group),
               threads=np.int64(_threads(xs, leaves[0::2])))
    k = len(leaves)
    return _layers(res[:k]), res[k], _layers(res[k + 1:])


def _scan_plain(state, xs, tok, ln_weight, ln_bias, group):
    end, z, _ = _forward(state, xs, tok, ln_weight, ln_bias, xs[0].shape[1])
    return end, z


def _scan_fwd(state, xs, tok, ln_weight, ln_bias, group):
    end, z, starts = _forward(state, xs, tok, ln_weight, ln_bias, group)
    return (end, z), (starts, xs, tok, ln_weight, ln_bias)


def _scan_bwd(group, res, cts):
    starts, xs, tok, ln_weight, ln_bias = res
    d_end, dz = cts
    leaves, d_leaves = _leaves(starts), _leaves(d_end)
    bsz, heads, f = leaves[0].shape[1], leaves[0].shape[2], leaves[0].shape[3]
    out = (*(_spec(a.shape[1:]) for a in leaves), *(_spec(x.shape) for x in xs),
           _spec((bsz, heads, tok.shape[0])), _spec((bsz, heads, f)), _spec((bsz, heads, f)))
    call = jax.ffi.ffi_call(_TARGETS[len(starts)][1], out, vmap_method="sequential")
    res = call(*leaves, *_f32(*xs, tok, ln_weight, ln_bias, *d_leaves, dz),
               group=np.int64(group), threads=np.int64(_threads(xs, leaves[0::2])))
    k = len(leaves)
    d_xs, (dtok, dlnw, dlnb) = res[k:k + 4], res[k + 4:]
    cast = lambda d, like: d.astype(like.dtype)  # noqa: E731
    return (_layers(res[:k]), tuple(cast(d, x) for d, x in zip(d_xs, xs)),
            cast(dtok.sum((0, 1)), tok), cast(dlnw.sum(0).reshape(ln_weight.shape), ln_weight),
            cast(dlnb.sum(0).reshape(ln_bias.shape), ln_bias))


scan = jax.custom_vjp(_scan_plain, nondiff_argnums=(5,))
scan.defvjp(_scan_fwd, _scan_bwd)
scan.__doc__ = """``ttt_scan.scan_tokens`` in the native kernel, for one inner layer (TTT-Linear)
or two (TTT-MLP, ``f -> h -> f``).

``scan(state, xs, tok, ln_weight, ln_bias, group) -> (state, z_bar)``: ``state`` a tuple of
``(W [B, H, f_in, f_out], bias [B, H, 1, f_out])`` layers, ``xs = (xq, xk, xv, lr)``
token-major ``[B, n, b, H, f]`` (``lr: [B, n, b, H]``), ``tok: [b]``,
``ln_weight, ln_bias: [H, 1, f]``; the derivative keeps the state every ``group``
mini-batches. Call ``load()`` first (or let ``use_kernel`` do it).
"""
