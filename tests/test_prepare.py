"""``ttt-jax prepare`` and training on its output: tokenizers trained here (no download), the
outputs against each tokenizer's own encoding, the hash split recomputed independently,
workers, interrupted runs, errors, ``data.prepared`` / ``data.val_path``, generate and the
standard presets' ``--check``."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ttt_jax.cli import main as cli_main
from ttt_jax.data import stdlib_dir

REPO = Path(__file__).resolve().parents[1]
VAL_FRACTION = 0.2
SEED = 3
EOT = "<|endoftext|>"


def stdlib_documents(limit: int = 300_000) -> list[str]:
    """The first standard-library sources by name, about ``limit`` bytes: one per document."""
    docs, total = [], 0
    for path in sorted(stdlib_dir().glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text or total + len(text) > limit:
            continue
        docs.append(text)
        total += len(text)
        if total > limit * 0.95:
            break
    return docs


def val_by_hash(text: str, seed: int = SEED, fraction: float = VAL_FRACTION) -> bool:
    """The documented split rule, written out again here."""
    h = hashlib.sha256(str(seed).encode() + b":" + text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


def joined(docs, encode, eos) -> np.ndarray:
    out = []
    for i, doc in enumerate(docs):
        out += ([eos] if i else []) + list(encode(doc))
    return np.asarray(out, np.int64)


@pytest.fixture(scope="module")
def docs():
    return stdlib_documents()


@pytest.fixture(scope="module")
def files(tmp_path_factory, docs):
    """The documents as one .jsonl, as a directory of .txt, and a gzipped .jsonl."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                             for i, d in enumerate(docs)))
    (root / "txt").mkdir()
    for i, d in enumerate(docs):
        (root / "txt" / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    with gzip.open(root / "docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, docs):
    """A byte-level BPE tokenizer.json (512 ids) trained on the documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, docs):
    """A SentencePiece BPE model (400 pieces) trained on the documents' lines."""
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("spm") / "sp"
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    path = Path(f"{prefix}.model")
    return path, spm.SentencePieceProcessor(model_file=str(path))


def run_prepare(*argv) -> int:
    return cli_main(["prepare", *map(str, argv), "--quiet"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, files, bpe):
    out = tmp_path_factory.mktemp("prepared") / "bpe"
    assert run_prepare(files / "docs.jsonl", "--tokenizer", bpe[0], "--out", out,
                       "--val-fraction", VAL_FRACTION, "--seed", SEED) == 0
    return out


def read(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def test_bpe_output_is_the_tokenizers_own_encoding(prepared, docs, bpe):
    path, tok = bpe
    eos = tok.token_to_id(EOT)
    encode = lambda d: tok.encode(d, add_special_tokens=False).ids  # noqa: E731
    val = [d for d in docs if val_by_hash(d)]
    train = [d for d in docs if not val_by_hash(d)]
    assert val and train
    np.testing.assert_array_equal(read(prepared, "train"), joined(train, encode, eos))
    np.testing.assert_array_equal(read(prepared, "val"), joined(val, encode, eos))
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size() == 512
    assert meta["separator"] == eos and meta["tokenizer"]["kind"] == "huggingface"
    assert meta["splits"]["train"]["documents"] == len(train)
    assert meta["splits"]["val"]["tokens"] == read(prepared, "val").size
    for split, part in (("train", train), ("val", val)):  # UTF-8 bytes, for bits per byte
        assert meta["splits"][split]["bytes"] == sum(len(d.encode("utf-8")) for d in part)
    assert meta["split"]["seed"] == SEED and meta["split"]["val_fraction"] == VAL_FRACTION
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["tokenizer"]["sha256"] == sha
    assert hashlib.sha256((prepared / "tokenizer.json").read_bytes()).hexdigest() == sha


def test_sentencepiece_directory_and_gzip_inputs(tmp_path, files, docs, spm_model):
    path, sp = spm_model
    out = tmp_path / "sp"
    assert run_prepare(files / "txt", "--tokenizer", path, "--out", out,
                       "--val-fraction", VAL_FRACTION, "--seed", SEED) == 0
    encode = lambda d: sp.encode(d, out_type=int)  # noqa: E731
    eos = sp.eos_id()
    np.testing.assert_array_equal(read(out, "train"),
                                  joined([d for d in docs if not val_by_hash(d)], encode, eos))
    np.testing.assert_array_equal(read(out, "val"),
                                  joined([d for d in docs if val_by_hash(d)], encode, eos))
    assert (out / "tokenizer.model").read_bytes() == path.read_bytes()
    gz = tmp_path / "gz"
    assert run_prepare(files / "docs.jsonl.gz", "--field", "body", "--tokenizer", path,
                       "--out", gz, "--val-fraction", VAL_FRACTION, "--seed", SEED) == 0
    for split in ("train", "val"):
        assert (gz / f"{split}.bin").read_bytes() == (out / f"{split}.bin").read_bytes()


def test_two_workers_write_the_same_bytes(tmp_path, files, bpe, prepared, monkeypatch):
    from ttt_jax.prepare import pipeline

    monkeypatch.setattr(pipeline, "BATCH_DOCS", 5)  # many batches in flight
    out = tmp_path / "w2"
    assert run_prepare(files / "docs.jsonl", "--tokenizer", bpe[0], "--out", out,
                       "--val-fraction", VAL_FRACTION, "--seed", SEED, "--workers", 2) == 0
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name


def test_a_failure_midway_leaves_no_output(tmp_path, files, monkeypatch, capsys):
    from ttt_jax.prepare import pipeline, writer

    monkeypatch.setattr(pipeline, "BATCH_DOCS", 2)
    calls = []
    original = writer.SplitWriter.write

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return original(self, *args)

    monkeypatch.setattr(writer.SplitWriter, "write", failing)
    with pytest.raises(OSError, match="injected"):
        cli_main(["prepare", str(files / "txt"), "--tokenizer", "bytes", "--out",
                  str(tmp_path / "out"), "--quiet"])
    assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == []  # neither the output nor its staging directory


def test_a_killed_prepare_leaves_nothing_that_looks_complete(tmp_path, files):
    out = tmp_path / "out"
    code = ("import sys, time; from ttt_jax.prepare import writer as w; o = w.SplitWriter.write\n"
            "w.SplitWriter.write = lambda s, *a: (time.sleep(0.2), o(s, *a))[1]\n"
            "from ttt_jax.prepare.__main__ import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(files / "txt"), "--tokenizer",
                             "bytes", "--out", str(out), "--quiet"], cwd=REPO,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.partial-*/train.bin")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    from ttt_jax.data.prepared import read_meta

    partial, = tmp_path.glob(".out.partial-*")
    assert (partial / "train.bin").exists() and not (partial / "meta.json").exists()
    with pytest.raises(ValueError, match="no meta.json"):
        read_meta(partial)


@pytest.mark.parametrize("case, message", [
    ("bad_json", "line 2 is not JSON"),
    ("bad_gzip", "is unreadable"),
    ("missing_field", "has no string field 'text'"),
    ("empty", "hold no document with text"),
    ("exists", "already exists: pass --force"),
    ("no_pyarrow", "pip install 'ttt-jax[data]'"),
    ("uint16", "cannot hold the tokenizer's vocabulary"),
])
def test_errors_are_one_line(case, message, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{oops\n')
    args = ["--tokenizer", "bytes"]
    if case == "bad_gzip":
        src = tmp_path / "in.jsonl.gz"
        src.write_bytes(b"\x1f\x8b\x08\x00garbage")
    elif case == "missing_field":
        src.write_text('{"body": "a"}\n')
    elif case == "empty":
        src.write_text('{"text": ""}\n')
    elif case == "exists":
        (tmp_path / "out").mkdir()
    elif case == "no_pyarrow":
        src = tmp_path / "in.parquet"
        src.write_bytes(b"PAR1")
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    elif case == "uint16":
        from ttt_jax.prepare.writer import choose_dtype

        with pytest.raises(ValueError, match=message):
            choose_dtype(70_000, "uint16")
        assert choose_dtype(70_000) == "uint32" and choose_dtype(65_536) == "uint16"
        return
    assert run_prepare(src, *args, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err
    assert not list(tmp_path.glob(".out.partial-*"))


def test_parquet_input_equals_jsonl(tmp_path, docs, prepared, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet", row_group_size=7)
    out = tmp_path / "pq"
    assert run_prepare(tmp_path / "docs.parquet", "--tokenizer", bpe[0], "--out", out,
                       "--val-fraction", VAL_FRACTION, "--seed", SEED) == 0
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (prepared / name).read_bytes()


def test_saved_hf_dataset_equals_jsonl(tmp_path, docs, prepared, bpe):
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "hf"
    assert run_prepare(tmp_path / "ds", "--tokenizer", bpe[0], "--out", out,
                       "--val-fraction", VAL_FRACTION, "--seed", SEED) == 0
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (prepared / name).read_bytes()


def small_config(run_dir, **data):
    from ttt_jax.config import from_dict

    from ttt_jax import RunConfig

    return from_dict(RunConfig, {
        "model": {"vocab_size": 512, "num_layers": 1, "intermediate_size": 32,
                  "ttt": {"model_dim": 16, "num_heads": 2, "mini_batch_size": 8}},
        "optim": {"learning_rate": 0.02, "warmup_steps": 2},
        "data": {"seq_len": 32, "batch_size": 8, **data},
        "train": {"steps": 20, "eval_every": 20, "eval_batches": 2, "log_every": 5,
                  "run_dir": str(run_dir)},
        "checkpoint": {"every": 20, "keep": 1}})


def test_train_on_prepared_then_generate(tmp_path, prepared, bpe, docs, capsys):
    from ttt_jax.models.registration import build_datasets
    from ttt_jax.trainer import run

    data = tmp_path / "data"  # a copy, removed below: the run keeps its own tokenizer
    shutil.copytree(prepared, data)
    cfg = small_config(tmp_path / "run", prepared=str(data))
    assert cfg.data.source == "prepared"
    lines = []
    out = run(cfg, print_fn=lines.append)
    assert out["end_val_loss"] < out["start_val_loss"] - 0.3, out
    assert any("'tokenizer': 'huggingface'" in line for line in lines)
    kept = tmp_path / "run" / "tokenizer"
    assert (kept / "tokenizer.json").read_bytes() == bpe[0].read_bytes()
    assert json.loads((kept / "meta.json").read_text())["prepared"] == str(data.resolve())
    # bits per byte: nats per token / ln 2 * tokens / UTF-8 bytes of the validation documents
    val_docs = [d for d in docs if val_by_hash(d)]
    bytes_per_token = sum(len(d.encode("utf-8")) for d in val_docs) / read(prepared, "val").size
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in records if r["kind"] == "eval"]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / np.log(2) / bytes_per_token)

    # the same files through source: tokens with a separate val file
    tokens = small_config(tmp_path / "run2", source="tokens", token_dtype="uint16",
                          path=str(prepared / "train.bin"), val_path=str(prepared / "val.bin"))
    train, val = build_datasets(tokens)
    np.testing.assert_array_equal(val.tokens, read(prepared, "val"))
    np.testing.assert_array_equal(train.tokens, read(prepared, "train"))

    # The loss by position reads the run's own prepared validation split.
    out_dir = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "run"), "--lengths", "16",
                     "--num-sequences", "2", "--out", str(out_dir)]) == 0
    (model,) = json.loads((out_dir / "eval_context.json").read_text())["models"]
    assert model["data_source"] == "prepared"
    loss = model["lm"]["16"]["loss"]
    assert np.isfinite(loss) and loss < np.log(512)  # better than uniform over the tokenizer
    assert model["lm"]["16"]["bpb"] == pytest.approx(loss / np.log(2) / bytes_per_token)

    shutil.rmtree(data)  # generate decodes with the run's copy of the tokenizer
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def ",
                     "-n", "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("def ") and len(text) > len("def ")
    assert "Ġ" not in text and "Ċ" not in text  # decoded, not byte-level BPE pieces


def test_standard_preset_check_requires_prepared(tmp_path, prepared, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", "ttt_linear_125m", "--check"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.prepared is not set") and "ttt-jax prepare" in err
    assert cli_main(argv + ["--set", f"data.prepared={prepared}"]) == 0
    captured = capsys.readouterr()
    assert "data prepared ok" in captured.out
    assert "warning: model.vocab_size=32000 is more than 2x the 512 ids" in captured.err
    assert cli_main(argv + ["--set", f"data.prepared={prepared}",
                            "--set", "model.vocab_size=500"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.vocab_size=500 is invalid: the huggingface tokenizer of "
                          "data.prepared=") and "has 512 ids" in err, err
