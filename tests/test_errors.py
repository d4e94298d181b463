"""Bad configs and bad inputs through ``train.py --check``: exit code 2 and a message that names
the field or file. The README's "Errors" table lists the same cases. And the one wrapper every
command reports its errors through (``ttt_jax.errors``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ttt_jax.checkpoint import CheckpointError
from ttt_jax.errors import EXIT_USAGE, UsageError, run_command

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture
def main(train_main):
    return train_main


def token_file(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


# (case id, overrides or a callable tmp_path -> argv, words the error must contain)
CASES = [
    ("missing config file", lambda t: ["--config", str(t / "nope.yaml")], ["nope.yaml", "does not exist"]),
    ("unknown preset", lambda t: ["--config", "tiny_rope"], ["'tiny_rope' does not exist", "preset", "tiny_mlp_rope"]),
    ("invalid YAML", lambda t: ["--config", _write(t / "bad.yaml", "model: [1, 2")], ["bad.yaml", "not valid YAML"]),
    ("unknown key", ["model.ttt.fast=true"], ["model.ttt.fast", "unknown key"]),
    ("wrong type", ["model.ttt.num_heads=eight"], ["model.ttt.num_heads", "integer"]),
    ("mini_batch_size <= 0", ["model.ttt.mini_batch_size=0"], ["mini_batch_size", "positive integer"]),
    ("unknown ttt_layer_type", ["model.ttt.ttt_layer_type=conv"], ["ttt_layer_type", "'linear'", "'mlp'"]),
    ("unknown rope_layout", ["model.ttt.rope_layout=diagonal"], ["rope_layout", "'interleaved'", "'half'"]),
    ("odd head_dim with RoPE", ["model.ttt.model_dim=24", "model.ttt.num_heads=8",
                                "model.ttt.use_rope=true"], ["num_heads", "even head_dim"]),
    ("heads do not divide width", ["model.ttt.num_heads=5"], ["num_heads", "divisor of model_dim=128"]),
    ("negative learning rate", ["optim.learning_rate=-1"], ["optim.learning_rate", "positive"]),
    ("Adam b2 out of range", ["optim.b2=1.5"], ["optim.b2", "[0.0, 1.0]"]),
    ("unknown data source", ["data.source=web"], ["data.source", "'bytes'"]),
    ("token source without a path", ["data.source=tokens"], ["data.path", "token file"]),
    ("missing token file", lambda t: ["--set", "data.source=tokens", "--set",
                                      f"data.path={t / 'gone.npy'}"], ["gone.npy"]),
    ("token id out of range", lambda t: ["--set", "data.source=tokens", "--set", "data.path="
                                         + token_file(t, "big.npy", np.full(5000, 300, np.uint16))],
     ["big.npy", "300", "256"]),
    ("empty token file", lambda t: ["--set", "data.source=tokens", "--set", "data.path="
                                    + token_file(t, "empty.npy", np.zeros(0, np.uint16))],
     ["empty.npy", "empty"]),
    ("token file shorter than a sequence", lambda t: ["--set", "data.source=tokens", "--set",
                                                      "data.path=" + token_file(
                                                          t, "short.npy", np.arange(50, dtype=np.uint16))],
     ["short.npy", "129"]),
    ("wrong token dtype", lambda t: ["--set", "data.source=tokens", "--set", "data.path="
                                     + token_file(t, "f.npy", np.zeros(5000, np.float32))],
     ["f.npy", "float32", "uint16"]),
    ("grad_accum does not divide batch", ["train.grad_accum=3"], ["train.grad_accum", "divisor of data.batch_size=16"]),
    ("zero steps", ["train.steps=0"], ["train.steps", ">= 1"]),
    ("keep no checkpoints", ["checkpoint.keep=0"], ["checkpoint.keep", ">= 1"]),
    ("malformed override", ["model.ttt.use_rope"], ["model.ttt.use_rope", "key.sub=value"]),
]


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, args, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_clear_error(main, tmp_path, capsys, case, args, words):
    if callable(args):
        argv = args(tmp_path)
        if argv[0] != "--config":
            argv = ["--config", TINY] + argv
    else:
        argv = ["--config", TINY] + [a for o in args for a in ("--set", o)]
    assert main(argv + ["--check"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_good_config_passes_check(main, capsys):
    assert main(["--config", TINY, "--check"]) == 0
    assert "parameters" in capsys.readouterr().out


@pytest.mark.parametrize("error", [UsageError("bad flag"), ValueError("bad value"),
                                   FileNotFoundError("no file"), FileExistsError("file exists"),
                                   CheckpointError("bad checkpoint")], ids=lambda e: type(e).__name__)
def test_one_wrapper_reports_user_errors_in_one_line(capsys, error):
    def command():
        raise error

    assert run_command(command) == EXIT_USAGE == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_the_wrapper_passes_results_and_other_errors_through():
    assert run_command(lambda: None) == 0 and run_command(lambda x: x, 3) == 3
    with pytest.raises(RuntimeError):
        run_command(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_no_command_reports_errors_on_its_own():
    """``error:`` lines and exit code 2 come from ``ttt_jax.errors`` only."""
    own = [str(p.relative_to(REPO)) for p in (REPO / "ttt_jax").rglob("*.py")
           if p.name != "errors.py"
           and any(s in p.read_text() for s in ('print(f"error:', "USAGE_ERROR", "CLIError"))]
    assert not own
