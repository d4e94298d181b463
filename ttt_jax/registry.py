"""Architectures: everything a run needs that depends on the model family, in one table.

An ``Architecture`` names its run-config class, how to build the model and its datasets, the
param groups of the optimizer, and the optional features it supports. The trainer, ``train.py``
and every command look the architecture up here (``of(cfg)``, by the run config's
``architecture`` field) and never inspect a config to guess what it is.

Built-in entries: ``ttt_lm`` (the TTT-LM), ``attention_lm`` (the same causal LM with
sliding-window attention, a baseline), ``moshi_ttt`` (Moshi's transformer with TTT layers
grafted in) and ``moshi_lm`` (Moshi's whole multi-stream model, same graft). A new
architecture is one package that calls ``register`` when imported; a built-in one also
names that module in ``_BUILTIN``, so that ``get`` finds it by name before anything imported
it (docs/architecture.md §7, §10).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

# Optional features a run or a command can ask for; each architecture lists those it supports.
FEATURES = ("diagnostics", "generate", "export", "eval", "mesh")
DEFAULT_ARCHITECTURE = "ttt_lm"
# Length of the dummy input that ``init`` traces (param shapes do not depend on it).
INIT_LENGTH = 8


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes:
      name: the value of ``architecture:`` in a run YAML.
      run_config: the dataclass of a whole run YAML (it has an ``architecture`` field).
      build_model: model config -> Linen module; ``module.init`` gives the run's initial
        params (every config flag, e.g. a no-op graft, applied by the module itself).
      sample_input: ``(model config, batch, length) -> int32 zeros`` of the model's input shape.
      build_datasets: run config -> ``(train, val)`` datasets (``ttt_jax.data.Dataset``).
      features: the optional features (of ``FEATURES``) it supports.
      param_group: param path (``a/b/c``) -> optimizer group; ``None``: one group.
      lr_scales: run config -> learning-rate multiplier per group.
      frozen_groups: run config -> groups whose params are not updated.
      export: ``(run config, params, out dir, *, dtype, force, allow_inexact, key) -> str``
        writes the PyTorch files and returns a line saying what it wrote; present exactly
        when ``export`` is among the features.
      description: one line for ``--help`` and errors.
    """

    name: str
    run_config: type
    build_model: Callable[[Any], Any]
    sample_input: Callable[[Any, int, int], jax.Array]
    build_datasets: Callable[[Any], tuple]
    features: frozenset = frozenset()
    param_group: Optional[Callable[[str], str]] = None
    lr_scales: Callable[[Any], Mapping[str, float]] = lambda cfg: {}
    frozen_groups: Callable[[Any], Sequence[str]] = lambda cfg: ()
    export: Optional[Callable[..., str]] = None
    description: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ValueError(f"architecture {self.name!r}: unknown features {unknown}; "
                             f"expected some of {', '.join(FEATURES)}")
        if ("export" in self.features) != (self.export is not None):
            raise ValueError(f"architecture {self.name!r}: the export feature and the export "
                             f"hook go together")

    def supports(self, feature: str) -> bool:
        return feature in self.features

    def require(self, feature: str, key: str) -> None:
        """Raises ``ValueError`` naming ``key`` unless ``feature`` is supported."""
        if feature not in self.features:
            have = ", ".join(sorted(self.features)) or "none"
            raise ValueError(f"{key} is invalid: architecture {self.name!r} does not support "
                             f"{feature} (it supports: {have})")

    def check(self, cfg) -> None:
        """Refuses a run config that asks for a feature this architecture lacks."""
        if cfg.train.diagnostics_every:
            self.require("diagnostics", f"train.diagnostics_every={cfg.train.diagnostics_every}")
        if cfg.mesh is not None:
            self.require("mesh", "mesh")

    def init_params(self, model_cfg, key: jax.Array):
        """Fresh float32 params of ``build_model(model_cfg)``."""
        sample = self.sample_input(model_cfg, 1, INIT_LENGTH)
        return self.build_model(model_cfg).init(key, sample)["params"]

    def param_shapes(self, model_cfg):
        """``jax.ShapeDtypeStruct`` of every param (nothing allocated)."""
        return jax.eval_shape(lambda k: self.init_params(model_cfg, k), jax.random.PRNGKey(0))

    def count_params(self, model_cfg) -> int:
        return sum(x.size for x in jax.tree.leaves(self.param_shapes(model_cfg)))

    def make_optimizer(self, cfg):
        """The run's optax chain (``ttt_jax.training.make_optimizer`` with this model's groups)."""
        from ttt_jax.training import make_optimizer

        return make_optimizer(cfg.optim, cfg.train.steps, group_of=self.param_group,
                              scales=self.lr_scales(cfg), frozen=tuple(self.frozen_groups(cfg)))

    def init_state(self, cfg, optimizer, key: jax.Array):
        """The initial ``TrainState``; pure, so the trainer can jit it (or shard it). A model
        that carries state between steps (``training.carries_state``) starts with the fresh
        state of every batch row."""
        from ttt_jax.training import init_carry, new_state

        params = self.init_params(cfg.model, key)
        carry = init_carry(self.build_model(cfg.model), params, cfg.data.batch_size)
        return new_state(params, optimizer, carry)


_REGISTRY: dict[str, Architecture] = {}
# Built-in architectures, registered when their module is first imported.
_BUILTIN = {"ttt_lm": "ttt_jax.models.registration",
            "attention_lm": "ttt_jax.models.registration",
            "moshi_ttt": "ttt_jax.moshi.registration",
            "moshi_lm": "ttt_jax.moshi.registration"}


def register(arch: Architecture) -> Architecture:
    """Adds ``arch`` under ``arch.name`` (re-registering the same name replaces it)."""
    _REGISTRY[arch.name] = arch
    return arch


def names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get(name: str) -> Architecture:
    """The architecture called ``name``; ``ValueError`` naming the ``architecture`` key if none."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"architecture={name!r} is invalid: expected one of "
                         + ", ".join(repr(n) for n in names()))
    return _REGISTRY[name]


def of(cfg) -> Architecture:
    """The architecture of a run config."""
    return get(cfg.architecture)


def run_config_class(data: Any, where: str = "config") -> type:
    """The run-config class of a parsed run YAML, from its ``architecture`` key."""
    name = data.get("architecture", DEFAULT_ARCHITECTURE) if isinstance(data, Mapping) else \
        DEFAULT_ARCHITECTURE
    if not isinstance(name, str):
        raise ValueError(f"{where}: architecture={name!r} is invalid: expected one of "
                         + ", ".join(repr(n) for n in names()))
    try:
        return get(name).run_config
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def run_config_from_dict(data: Mapping, where: str = "config"):
    """A run config of any architecture from a mapping (e.g. a checkpoint's saved config)."""
    from ttt_jax.config import from_dict

    return from_dict(run_config_class(data, where), data)


def load_run(path, overrides: Sequence[str] = ()):
    """Reads a run YAML of any architecture, applies ``--set`` overrides and checks that the
    architecture supports every feature the config asks for. Errors name the file and key."""
    from ttt_jax.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(path), list(overrides))
    of(cfg).check(cfg)
    return cfg
