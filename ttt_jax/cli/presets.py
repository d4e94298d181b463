"""The packaged presets (``ttt_jax/configs``, which the checkout's ``configs/`` links to) and the
``--config`` argument that takes a YAML path or a preset name.

``resolve("tiny")`` is the packaged ``tiny.yaml``, ``resolve("experiments/bytes_swa")`` the
experiment preset; an existing file always wins over a preset of the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ttt_jax.errors import UsageError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
SUFFIX = ".yaml"
# YAML files there that are not run configs (none today: the public Moshi-TTT `ttt:` block of
# ttt_with_rope_example.yaml trains the moshi_ttt_tiny preset, ttt_jax.moshi.config).
NOT_RUNS: tuple[str, ...] = ()


def names() -> list[str]:
    """Every preset name: the run YAMLs under ``PRESET_DIR``, relative, without ``.yaml``."""
    found = (p.relative_to(PRESET_DIR).with_suffix("").as_posix()
             for p in PRESET_DIR.rglob(f"*{SUFFIX}"))
    return sorted(n for n in found if n not in NOT_RUNS)


def resolve(value: str | Path) -> Path:
    """The YAML file ``value`` names: the file itself if it exists, else the packaged preset of
    that name (with or without ``.yaml``); ``UsageError`` listing the presets otherwise."""
    path = Path(value)
    if path.is_file():
        return path
    name = str(value)[:-len(SUFFIX)] if str(value).endswith(SUFFIX) else str(value)
    known = names()
    if name in known:
        return PRESET_DIR / f"{name}{SUFFIX}"
    if path.is_dir():
        raise UsageError(f"--config {str(value)!r} is a directory: expected a YAML file or a "
                         f"packaged preset name")
    raise UsageError(f"--config {str(value)!r} does not exist: expected a YAML file or a "
                     f"packaged preset ({', '.join(known)})")


def load(value: str | Path, overrides: Sequence[str] = ()):
    """The run config of ``--config value`` with ``--set`` overrides, any architecture
    (``ttt_jax.registry.load_run``)."""
    from ttt_jax import registry

    return registry.load_run(resolve(value), overrides)
