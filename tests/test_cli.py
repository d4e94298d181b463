"""The ``ttt-jax`` command line: the packaged presets behind ``--config NAME``, the generated
config reference of ``train --help``, the entry points, and commands refusing an architecture
that lacks their feature."""

from __future__ import annotations

import dataclasses
import glob
import re
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path

import jax
import pytest

from ttt_jax import ModelConfig, RunConfig, TTTConfig, registry
from ttt_jax.cli import main, presets
from ttt_jax.config import TrainConfig

from conftest import save_untrained_run

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------- presets


def test_configs_is_the_package_directory():
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == presets.PRESET_DIR == REPO / "ttt_jax" / "configs"


def test_every_yaml_is_a_preset_and_ships_in_the_package():
    files = {p.relative_to(presets.PRESET_DIR).with_suffix("").as_posix()
             for p in presets.PRESET_DIR.rglob("*.yaml")}
    assert {"tiny", "moshi_ttt_tiny", "experiments/bytes_swa"} <= set(presets.names())
    assert files == set(presets.names()) | set(presets.NOT_RUNS)
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["ttt_jax"]
    shipped = {Path(f) for g in globs for f in glob.glob(str(REPO / "ttt_jax" / g))}
    assert {presets.PRESET_DIR / f"{name}.yaml" for name in files} <= shipped


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_resolves_and_loads(name):
    path = presets.resolve(name)
    assert path == presets.PRESET_DIR / f"{name}.yaml"
    assert presets.resolve(f"{name}.yaml") == path
    cfg = registry.load_run(path)
    assert registry.of(cfg).name == cfg.architecture


def test_a_file_wins_over_a_preset_and_an_unknown_name_lists_them(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)  # outside the checkout: presets still resolve
    assert presets.resolve("tiny") == presets.PRESET_DIR / "tiny.yaml"
    (tmp_path / "tiny").write_text("model: {}\n")
    assert presets.resolve("tiny") == Path("tiny")
    assert main(["train", "--config", "tinyy", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config 'tinyy' does not exist") and err.count("\n") == 1
    assert all(name in err for name in presets.names())


# ----------------------------------------------------------------------------- help


def dotted_keys(cls, prefix=""):
    """Every key of a run config, sections included, e.g. ``model.ttt.mini_batch_size``."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        yield prefix + field.name
        if dataclasses.is_dataclass(tp):
            yield from dotted_keys(tp, f"{prefix}{field.name}.")


def test_train_help_lists_every_config_key_of_every_architecture(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ttt-jax train" in out and "--set KEY=VALUE" in out
    listed = set(re.findall(r"^  (\S+) \(", out, re.M))
    for name in registry.names():
        cls = registry.get(name).run_config
        assert name in out and cls.__name__ in out
        missing = [k for k in dotted_keys(cls) if k not in listed]
        assert not missing, (name, missing)
    # types, defaults and the docstring's description, e.g.:
    assert re.search(r"^  model\.ttt\.mini_batch_size \(int, default 16\): b, tokens per inner",
                     out, re.M), out
    assert all(name in out for name in presets.names())


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "export", "import", "generate", "eval"):
        assert re.search(rf"^    {command} ", out, re.M), command


def test_console_script_and_module_entry_point(tmp_path):
    assert PYPROJECT["project"]["scripts"] == {"ttt-jax": "ttt_jax.cli:main"}
    result = subprocess.run([sys.executable, "-m", "ttt_jax", "train", "--config", "nope"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --config 'nope' does not exist")
    assert result.stderr.count("\n") == 1, result.stderr


# ----------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    """A step-0 checkpoint of a small ``attention_lm`` run (no training)."""
    run_dir = tmp_path_factory.mktemp("swa") / "run"
    model = ModelConfig(vocab_size=256, num_layers=1, intermediate_size=32,
                        ttt=TTTConfig(model_dim=16, num_heads=2, mini_batch_size=4),
                        seq_modeling="swa", attention_window=8)
    cfg = RunConfig(model=model, architecture="attention_lm",
                    train=TrainConfig(run_dir=str(run_dir)))
    params = registry.of(cfg).init_params(model, jax.random.PRNGKey(0))
    return save_untrained_run(run_dir, cfg, params)


@pytest.mark.parametrize("command, feature", [
    (["generate", "--prompt", "x"], "generate"),
    (["export", "--out", "OUT"], "export"),
])
def test_a_command_refuses_an_architecture_without_its_feature(attention_run, tmp_path, capsys,
                                                               command, feature):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(argv + ["--checkpoint", str(attention_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint is invalid: architecture 'attention_lm' does "
                          f"not support {feature} (it supports: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
