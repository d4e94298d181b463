"""Bad configs and bad inputs through ``train.py`` (with and without ``--check``): exit code 2
and exactly one ``error:`` line naming the field or file, the offending value and what is
expected, as the README's "Errors" table documents row by row, with the run directory neither
created nor changed. And the one wrapper every command reports its errors through
(``ttt_jax.errors``)."""

from __future__ import annotations

import re
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


# The README's "Errors" table, one entry per row: the row's name, ``--config`` (None: tiny.yaml),
# ``--set`` overrides, files to create first (name -> text or array), and what the one error
# line must hold: the field (or file), the offending value and the expectation. "{tmp}" stands
# for the test's temporary directory (the README writes DIR).
CASES = [
    dict(row="missing config file", config="{tmp}/nope.yaml",
         field="--config", value="{tmp}/nope.yaml", expect="expected a YAML file or a packaged preset"),
    dict(row="unknown preset", config="tiny_rope",
         field="--config", value="'tiny_rope'", expect="expected a YAML file or a packaged preset"),
    dict(row="invalid YAML", config="{tmp}/bad.yaml", files={"bad.yaml": "model: [1, 2"},
         field="config file", value="{tmp}/bad.yaml", expect="is not valid YAML"),
    dict(row="unknown key", set=["model.ttt.fast=true"],
         field="model.ttt.fast", value="'model.ttt.fast=true'", expect="unknown key"),
    dict(row="wrong type", set=["model.ttt.num_heads=eight"],
         field="model.ttt.num_heads", value="='eight'", expect="expected an integer"),
    dict(row="mini_batch_size <= 0", set=["model.ttt.mini_batch_size=0"],
         field="mini_batch_size", value="=0 ", expect="expected a positive integer"),
    dict(row="unknown ttt_layer_type", set=["model.ttt.ttt_layer_type=conv"],
         field="model.ttt.ttt_layer_type", value="='conv'", expect="expected one of 'linear', 'mlp'"),
    dict(row="unknown rope_layout", set=["model.ttt.rope_layout=diagonal"],
         field="model.ttt.rope_layout", value="='diagonal'",
         expect="expected one of 'interleaved', 'half'"),
    dict(row="odd head_dim with RoPE", set=["model.ttt.model_dim=24", "model.ttt.num_heads=8",
                                            "model.ttt.use_rope=true"],
         field="num_heads", value="=8 ", expect="expected a value giving an even head_dim"),
    dict(row="heads do not divide width", set=["model.ttt.num_heads=5"],
         field="num_heads", value="=5 ", expect="expected a divisor of model_dim=128"),
    dict(row="negative learning rate", set=["optim.learning_rate=-1"],
         field="optim.learning_rate", value="=-1.0", expect="expected a positive number"),
    dict(row="Adam b2 out of range", set=["optim.b2=1.5"],
         field="optim.b2", value="=1.5", expect="expected a number in [0.0, 1.0]"),
    dict(row="unknown data source", set=["data.source=web"],
         field="data.source", value="='web'", expect="expected one of 'bytes', 'recall', 'tokens'"),
    dict(row="token source without a path", set=["data.source=tokens"],
         field="data.path", value="=None", expect="expected the path of a .npy or .bin token file"),
    dict(row="missing token file", set=["data.source=tokens", "data.path={tmp}/gone.npy"],
         field="token file", value="{tmp}/gone.npy", expect="does not exist: expected a .npy file"),
    dict(row="token id out of range", set=["data.source=tokens", "data.path={tmp}/big.npy"],
         files={"big.npy": np.full(5000, 300, np.uint16)},
         field="{tmp}/big.npy", value="token id 300", expect="expected every id in [0, 256)"),
    dict(row="empty token file", set=["data.source=tokens", "data.path={tmp}/empty.npy"],
         files={"empty.npy": np.zeros(0, np.uint16)},
         field="{tmp}/empty.npy", value="(0 tokens)", expect="expected at least one sequence"),
    dict(row="token file shorter than a sequence",
         set=["data.source=tokens", "data.path={tmp}/short.npy"],
         files={"short.npy": np.arange(50, dtype=np.uint16)},
         field="{tmp}/short.npy", value="has 50 tokens", expect="expected at least 258"),
    dict(row="wrong token dtype", set=["data.source=tokens", "data.path={tmp}/f.npy"],
         files={"f.npy": np.zeros(5000, np.float32)},
         field="{tmp}/f.npy", value="dtype float32", expect="expected uint16 or uint32"),
    dict(row="grad_accum does not divide batch", set=["train.grad_accum=3"],
         field="train.grad_accum", value="=3 ", expect="expected a divisor of data.batch_size=16"),
    dict(row="zero steps", set=["train.steps=0"],
         field="train.steps", value="=0 ", expect="expected an integer >= 1"),
    dict(row="keep no checkpoints", set=["checkpoint.keep=0"],
         field="checkpoint.keep", value="=0 ", expect="expected an integer >= 1"),
    dict(row="malformed override", set=["model.ttt.use_rope"],
         field="override", value="'model.ttt.use_rope'", expect="must look like key.sub=value"),
]


def readme_table() -> dict[str, str]:
    """The README's "Errors" table: row name -> the documented message."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| bad input | message |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        name, message = (cell.strip() for cell in line.strip("|").split("|", 1))
        rows[name] = message.strip().strip("`")
    return rows


def test_every_readme_row_is_a_case():
    """The table's rows start with these cases, in order (the rows after them, faults of the
    run directory, are tests/test_faults.py's)."""
    rows = list(readme_table())
    assert rows[:len(CASES)] == [case["row"] for case in CASES]


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes and modification time (None: absent)."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None,
                                            p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def assert_one_error_line(main, capsys, argv, case, tmp, readme_message):
    """``main(argv)`` exits with 2 and writes exactly one stderr line: ``error: ...`` holding the
    case's field, value and expectation, and matching the README's row (DIR = ``tmp``, … any
    text). Returns that line."""
    assert main(argv) == EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line:\n{err}"
    line = err[:-1]
    assert line.startswith("error: "), line
    for key in ("field", "value", "expect"):
        part = case[key].replace("{tmp}", tmp)
        assert part in line, (key, part, line)
    pattern = ".*".join(re.escape(piece).replace("DIR", re.escape(tmp))
                        for piece in readme_message.split("…"))
    assert re.fullmatch(pattern, line), f"README says {readme_message!r}, got {line!r}"
    return line


# Rows whose message is known not to be one line yet: the test must fail for them (strict).
NOT_ONE_LINE: dict[str, str] = {}  # rows known not to give one line (none)


@pytest.mark.parametrize("mode", ["check", "train", "train-existing-run-dir"])
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=NOT_ONE_LINE[c["row"]]))
    if c["row"] in NOT_ONE_LINE else c for c in CASES], ids=[c["row"] for c in CASES])
def test_bad_input_gives_one_error_line_and_leaves_the_run_dir_alone(main, tmp_path, capsys,
                                                                      case, mode):
    """Every row of the README table, through ``train.py --check`` and through a plain
    ``train.py``: nothing is trained, and ``train.run_dir`` is neither created nor changed."""
    tmp = str(tmp_path)
    for name, content in case.get("files", {}).items():
        if isinstance(content, str):
            (tmp_path / name).write_text(content)
        else:
            np.save(tmp_path / name, content)
    run_dir = tmp_path / "run"
    if mode == "train-existing-run-dir":
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("# a previous run's\n")
        (run_dir / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "val_loss": 5.5}\n')
    before = snapshot(run_dir)
    config = case.get("config") or TINY
    argv = ["--config", config.replace("{tmp}", tmp), "--set", f"train.run_dir={run_dir}"]
    argv += [a for o in case.get("set", []) for a in ("--set", o.replace("{tmp}", tmp))]
    argv += ["--check"] if mode == "check" else ["--set", "train.steps=1"]
    if case["row"] == "zero steps":
        argv = argv[:-2] if mode != "check" else argv
    assert_one_error_line(main, capsys, argv, case, tmp, readme_table()[case["row"]])
    assert snapshot(run_dir) == before


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
