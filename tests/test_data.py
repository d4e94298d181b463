"""Tests of ttt_jax.data: determinism, exact resume, splits, recall answers, clear errors."""

import json
import re

import numpy as np
import pytest

from ttt_jax.data import (BYTE_VOCAB_SIZE, FILE_SEPARATOR, PAD_ID, Dataset, build_byte_corpus,
                          key_value_ranges, make_dataset, recall_sequence, stdlib_dir)

L, B = 13, 2


def _bytes(**kw):
    return make_dataset("bytes", **{"seq_len": L, "batch_size": B, "seed": 0, **kw})


def _save_tokens(tmp_path, tokens, name="toks.npy"):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    return path


# --- bytes ------------------------------------------------------------------------------------

def test_bytes_builds_and_has_the_documented_shape():
    ds = _bytes()
    assert isinstance(ds, Dataset)
    assert ds.vocab_size == BYTE_VOCAB_SIZE == 256
    batch = ds.batch(0)
    assert batch.shape == (B, L + 1) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < 256
    assert ds.loss_mask(0) is None
    info = ds.describe()
    assert info["source"] == "bytes" and info["split"] == "train" and info["num_tokens"] > 10**6
    json.dumps(info)  # goes into the JSONL logs as is


def test_bytes_same_seed_same_batches_different_seed_different_order():
    a, b, c = _bytes(seed=3), _bytes(seed=3), _bytes(seed=4)
    for step in (0, 1, 17, 5000):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    assert not all(np.array_equal(a.batch(s), c.batch(s)) for s in range(4))
    assert not np.array_equal(a.batch(0), a.batch(1))


def test_bytes_resume_in_any_order_matches_a_straight_run():
    straight = _bytes(seed=7)
    expected = [straight.batch(s) for s in range(6)]
    resumed = _bytes(seed=7)  # fresh build, asked for later steps first
    for s in (5, 3, 4, 0, 2, 1):
        np.testing.assert_array_equal(resumed.batch(s), expected[s])


def test_bytes_train_and_val_are_disjoint_files_read_from_the_stdlib():
    corpus = build_byte_corpus()
    assert corpus.val_files and corpus.train_files
    assert not set(corpus.val_files) & set(corpus.train_files)
    names = sorted(p.name for p in stdlib_dir().glob("*.py") if p.is_file())
    assert set(corpus.val_files) | set(corpus.train_files) <= set(names)
    assert corpus.train.size + corpus.val.size <= 4 * 2**20
    sep = bytes([FILE_SEPARATOR])
    for files, blob in ((corpus.train_files, corpus.train), (corpus.val_files, corpus.val)):
        expected = b"".join((stdlib_dir() / f).read_bytes() + sep for f in files)
        assert blob.tobytes() == expected
    train, val = _bytes(split="train"), _bytes(split="val")
    assert val.describe()["num_tokens"] == corpus.val.size
    assert train.describe()["num_tokens"] == corpus.train.size
    assert not np.array_equal(train.batch(0), val.batch(0))


def test_bytes_from_a_directory_splits_every_nth_file(tmp_path):
    for i in range(6):
        (tmp_path / f"f{i}.py").write_text(f"# file {i}\n" + "x = 1\n" * 20)
    corpus = build_byte_corpus(tmp_path, val_every=3)
    assert corpus.val_files == ("f2.py", "f5.py")
    assert corpus.train_files == ("f0.py", "f1.py", "f3.py", "f4.py")
    ds = make_dataset("bytes", seq_len=8, batch_size=2, seed=0, path=tmp_path, val_every=3,
                      split="val")
    assert ds.describe()["num_files"] == 2


# --- windows: every window inside the data, one visit per epoch ------------------------------

@pytest.mark.parametrize("batch_size", [3, 4])
def test_windows_stay_inside_the_data_and_cover_each_epoch_once(tmp_path, batch_size):
    n = 1000
    path = _save_tokens(tmp_path, np.arange(n, dtype=np.uint16))
    ds = make_dataset("tokens", seq_len=L, batch_size=batch_size, seed=1, path=path)
    num_train = ds.describe()["num_tokens"]
    window = L + 1
    num_windows = num_train // window
    starts = []
    for step in range(-(-2 * num_windows // batch_size)):
        batch = ds.batch(step)
        assert batch.shape == (batch_size, window)
        # The ids are the positions, so each row must be one contiguous in-range window.
        np.testing.assert_array_equal(batch, batch[:, :1] + np.arange(window))
        assert batch[:, 0].min() >= 0 and batch[:, -1].max() < num_train
        assert np.all(batch[:, 0] % window == 0)
        starts.extend(batch[:, 0].tolist())
    first, second = starts[:num_windows], starts[num_windows:2 * num_windows]
    assert sorted(first) == sorted(second) == list(range(0, num_windows * window, window))
    assert first != second  # each epoch has its own permutation


def test_tokens_val_is_the_tail_and_disjoint_from_train(tmp_path):
    n = 2000
    path = _save_tokens(tmp_path, np.arange(n, dtype=np.uint32))
    train = make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path,
                         val_fraction=0.1)
    val = make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path, split="val",
                       val_fraction=0.1)
    assert train.describe()["num_tokens"] == 1800 and val.describe()["num_tokens"] == 200
    assert train.vocab_size == val.vocab_size == n  # max id + 1 without a model vocab
    for step in range(30):
        assert train.batch(step).max() < 1800 <= val.batch(step).min()


def test_tokens_val_gets_at_least_one_window(tmp_path):
    path = _save_tokens(tmp_path, np.arange(100, dtype=np.uint16))
    val = make_dataset("tokens", seq_len=L, batch_size=4, seed=0, path=path, split="val")
    assert val.describe()["num_tokens"] == L + 1  # 1% of 100 is one token: rounded up
    np.testing.assert_array_equal(val.batch(3), np.tile(np.arange(86, 100), (4, 1)))


def test_raw_bin_memmap_reads_the_same_batches_as_npy(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50000, size=3000).astype(np.uint16)
    npy = _save_tokens(tmp_path, tokens)
    raw = _save_tokens(tmp_path, tokens, "toks.bin")
    a = make_dataset("tokens", seq_len=L, batch_size=B, seed=2, path=npy, vocab_size=50000)
    b = make_dataset("tokens", seq_len=L, batch_size=B, seed=2, path=raw, vocab_size=50000,
                     token_dtype="uint16")
    assert a.vocab_size == 50000
    for step in range(5):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))


# --- recall -----------------------------------------------------------------------------------

def _rederive_answers(row, num_pairs, keys):
    """Independent reference: walk the row; a key seen before is a query, the next token its answer.

    Returns the target indices of the queries and the expected answers there.
    """
    seen, positions, answers = {}, [], []
    for t in range(len(row) - 1):
        tok = int(row[t])
        if t < 2 * num_pairs:
            if t % 2 == 0:
                assert tok in keys and tok not in seen, "pair keys must be distinct keys"
                seen[tok] = int(row[t + 1])
        elif tok in seen:
            positions.append(t)
            answers.append(seen[tok])
    return positions, answers


@pytest.mark.parametrize("seq_len,num_pairs,vocab", [(13, 3, 16), (40, 8, 64), (41, 5, 33)])
def test_recall_answers_and_mask_match_an_independent_derivation(seq_len, num_pairs, vocab):
    ds = make_dataset("recall", seq_len=seq_len, batch_size=4, seed=5,
                      recall_num_pairs=num_pairs, recall_vocab=vocab, vocab_size=vocab)
    keys, values = key_value_ranges(vocab)
    assert set(keys).isdisjoint(values) and PAD_ID not in keys and PAD_ID not in values
    assert ds.vocab_size == vocab
    assert json.loads(json.dumps(ds.describe()))["source"] == "recall"
    for step in range(3):
        batch, mask = ds.batch(step), ds.loss_mask(step)
        assert batch.shape == (4, seq_len + 1) and batch.dtype == np.int32
        assert mask.shape == (4, seq_len) and mask.dtype == np.float32
        assert batch.min() >= 0 and batch.max() < vocab
        for row, row_mask in zip(batch, mask):
            positions, answers = _rederive_answers(row, num_pairs, set(keys))
            assert positions, "every sequence has at least one query"
            np.testing.assert_array_equal(np.flatnonzero(row_mask), positions)
            np.testing.assert_array_equal(row[1:][positions], answers)
            assert all(a in values for a in answers)


def test_recall_is_deterministic_and_val_uses_another_stream():
    kw = dict(seq_len=40, batch_size=4, recall_num_pairs=8)
    a, b = make_dataset("recall", seed=0, **kw), make_dataset("recall", seed=0, **kw)
    np.testing.assert_array_equal(a.batch(9), b.batch(9))
    assert not np.array_equal(a.batch(0), a.batch(1))
    assert not np.array_equal(a.batch(0), make_dataset("recall", seed=1, **kw).batch(0))
    val = make_dataset("recall", seed=0, split="val", **kw)
    assert not np.array_equal(a.batch(0), val.batch(0))


@pytest.mark.parametrize("distance", [2, 3, 10, 63])
def test_recall_sequence_plants_the_key_at_the_distance(distance):
    seq_len = 64
    ex = recall_sequence(np.random.default_rng(distance), seq_len, distance, recall_vocab=32)
    tokens = ex.tokens
    assert tokens.shape == (seq_len + 1,) and tokens.max() < 32
    assert ex.query_pos - ex.key_pos == distance and ex.answer_pos == ex.query_pos + 1 == seq_len
    assert tokens[ex.key_pos] == tokens[ex.query_pos] == ex.key
    assert tokens[ex.key_pos + 1] == tokens[ex.answer_pos] == ex.value
    assert np.flatnonzero(tokens == ex.key).tolist() == [ex.key_pos, ex.query_pos]
    keys, values = key_value_ranges(32)
    assert ex.key in keys and ex.value in values


def test_recall_sequence_rejects_impossible_distances():
    rng = np.random.default_rng(0)
    for distance in (1, 64, 0):
        with pytest.raises(ValueError, match=rf"distance={distance} .*\[2, 63\]"):
            recall_sequence(rng, 64, distance)


# --- errors -----------------------------------------------------------------------------------

def test_unknown_source():
    with pytest.raises(ValueError, match=r"source='wiki' .*'bytes', 'recall', 'tokens'"):
        make_dataset("wiki", seq_len=L, batch_size=B, seed=0)


@pytest.mark.parametrize("field,value", [("seq_len", 0), ("seq_len", -3), ("batch_size", 0),
                                         ("batch_size", 2.5), ("seed", -1)])
def test_bad_sizes(field, value):
    kw = {"seq_len": L, "batch_size": B, "seed": 0, field: value}
    with pytest.raises(ValueError, match=rf"data\.{field}={re.escape(repr(value))} is invalid"):
        make_dataset("recall", **kw)


def test_bad_split():
    with pytest.raises(ValueError, match=r"split='test' .*'train', 'val'"):
        make_dataset("bytes", seq_len=L, batch_size=B, seed=0, split="test")


def test_bad_step():
    with pytest.raises(ValueError, match=r"step=-1 is invalid"):
        _bytes().batch(-1)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=missing)
    with pytest.raises(FileNotFoundError, match="nope_dir"):
        make_dataset("bytes", seq_len=L, batch_size=B, seed=0, path=tmp_path / "nope_dir")
    with pytest.raises(ValueError, match=r"path=None .*'tokens'"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0)


@pytest.mark.parametrize("name", ["empty.npy", "zero_bytes.npy", "zero_bytes.bin"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    if name == "empty.npy":
        np.save(path, np.zeros(0, dtype=np.uint16))
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{re.escape(name)}' is empty"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path,
                     token_dtype="uint16")


def test_empty_bytes_directory(tmp_path):
    with pytest.raises(ValueError, match=r"has 0 readable non-empty '\*\.py' files"):
        make_dataset("bytes", seq_len=L, batch_size=B, seed=0, path=tmp_path)


@pytest.mark.parametrize("dtype", [np.int64, np.float32, np.uint8, np.int32])
def test_wrong_npy_dtype(tmp_path, dtype):
    path = _save_tokens(tmp_path, np.arange(100).astype(dtype))
    with pytest.raises(ValueError, match=rf"has dtype {np.dtype(dtype).name}: expected uint16"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path)


def test_wrong_token_dtype_option(tmp_path):
    raw = _save_tokens(tmp_path, np.arange(100, dtype=np.uint16), "t.bin")
    with pytest.raises(ValueError, match=r"token_dtype='int64' is invalid: .*'uint16', 'uint32'"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=raw, token_dtype="int64")
    with pytest.raises(ValueError, match=r"token_dtype=None is invalid for raw token file"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=raw)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"has 3 bytes, not a multiple of the 2-byte uint16"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=odd, token_dtype="uint16")
    # A .npy header names its dtype: the option (a config default) must not override it.
    npy = _save_tokens(tmp_path, np.arange(70000, dtype=np.uint32))
    ds = make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=npy, token_dtype="uint16")
    assert ds.vocab_size == 70000 and ds.describe()["dtype"] == "uint32"


def test_npy_must_be_one_dimensional(tmp_path):
    path = _save_tokens(tmp_path, np.zeros((10, 10), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"shape \(10, 10\): expected a 1-D array"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path)


def test_token_id_out_of_vocab_names_max_id_and_vocab(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    tokens[37] = 5000
    path = _save_tokens(tmp_path, tokens)
    with pytest.raises(ValueError, match=r"toks\.npy' has token id 5000 >= vocab_size=1000"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path, vocab_size=1000)
    with pytest.raises(ValueError, match=r"bytes corpus .* has token id \d+ >= vocab_size=100"):
        _bytes(vocab_size=100)
    with pytest.raises(ValueError, match=r"ids up to 63 \(recall_vocab=64\) >= vocab_size=32"):
        make_dataset("recall", seq_len=40, batch_size=B, seed=0, recall_vocab=64, vocab_size=32)


def test_data_shorter_than_one_sequence(tmp_path):
    path = _save_tokens(tmp_path, np.arange(10, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"has 10 tokens, shorter than one sequence of "
                                         r"seq_len\+1=14"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path)
    path = _save_tokens(tmp_path, np.arange(20, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"has 20 tokens: too few .* val split of 14 tokens"):
        make_dataset("tokens", seq_len=L, batch_size=B, seed=0, path=path)
    val_size = build_byte_corpus().val.size
    with pytest.raises(ValueError, match=rf"\(val split\) has {val_size} tokens, shorter than "
                                         rf"one sequence of seq_len\+1=1000001"):
        _bytes(seq_len=10**6, split="val")


def test_recall_configuration_errors():
    with pytest.raises(ValueError, match=r"seq_len=10 is too short for recall_num_pairs=8: "
                                         r"expected seq_len >= 17"):
        make_dataset("recall", seq_len=10, batch_size=B, seed=0, recall_num_pairs=8)
    with pytest.raises(ValueError, match=r"recall_vocab=10 is invalid: expected at least 17"):
        make_dataset("recall", seq_len=40, batch_size=B, seed=0, recall_num_pairs=8,
                     recall_vocab=10)
    with pytest.raises(ValueError, match=r"recall_num_pairs=0 is invalid"):
        make_dataset("recall", seq_len=40, batch_size=B, seed=0, recall_num_pairs=0)
    with pytest.raises(ValueError, match=r"path='x\.npy' is invalid for source 'recall'"):
        make_dataset("recall", seq_len=40, batch_size=B, seed=0, path="x.npy")
