"""``ttt-jax prepare --audio``: generated audio files -> Mimi codes, with Mimi built by the real
``moshi`` package from its own configuration and seeded random weights (no download)."""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest

pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("moshi")
torch = pytest.importorskip("torch")

from ttt_jax.cli import main as cli_main  # noqa: E402
from ttt_jax.prepare import audio  # noqa: E402

# name -> (sample rate, channels, seconds, signal kind)
FILES = {"a_sweep16k.wav": (16000, 1, 1.7, "sweep"), "b_noise44k.wav": (44100, 2, 0.9, "noise"),
         "c_sweep24k.wav": (24000, 1, 0.45, "sweep")}


def write_wav(path, rate, channels, seconds, kind, seed=0):
    n = int(round(rate * seconds))
    t = np.arange(n) / rate
    if kind == "sweep":
        x = 0.5 * np.sin(2 * np.pi * (100 + 400 * t) * t)
    elif kind == "noise":
        x = 0.3 * np.random.default_rng(seed).standard_normal(n)
    else:
        x = np.zeros(n)
    pcm = (np.clip(np.repeat(x[:, None], channels, 1), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return n


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio") / "in"
    d.mkdir()
    samples = {name: write_wav(d / name, *spec) for name, spec in FILES.items()}
    return d, samples


@pytest.fixture(scope="module")
def mimi():
    return audio.load_mimi(None, 0, 8)


@pytest.fixture(scope="module")
def prepared(recordings, tmp_path_factory):
    d, _ = recordings
    out = tmp_path_factory.mktemp("codes") / "out"
    assert cli_main(["prepare", "--audio", str(d), "--mimi-random-init", "0", "--out", str(out),
                     "--quiet"]) == 0
    return out


def test_frame_counts_follow_12_5_hz(prepared, recordings):
    _, samples = recordings
    meta = json.loads((prepared / "meta.json").read_text())
    assert (meta["sample_rate"], meta["frame_rate"], meta["codebooks"]) == (24000, 12.5, 8)
    assert [f["path"].rsplit("/", 1)[1] for f in meta["files"]] == sorted(FILES)
    for record, name in zip(meta["files"], sorted(FILES)):
        rate, _, seconds, _ = FILES[name]
        duration = samples[name] / rate
        assert record["seconds"] == pytest.approx(duration, abs=1 / 24000)
        want = math.ceil(round(duration * 24000) / 1920)  # whole 80 ms frames, the last padded
        assert want == math.ceil(duration * 12.5 - 1e-9)
        codes = np.load(prepared / record["file"])
        assert codes.shape == (8, want) and record["frames"] == want, name
        assert codes.dtype == np.uint16 and codes.max() < meta["card"] == 2048


def test_streaming_in_blocks_equals_one_shot_encoding(recordings, mimi, tmp_path, monkeypatch):
    import soundfile as sf
    import soxr

    d, _ = recordings
    path = d / "a_sweep16k.wav"
    monkeypatch.setattr(audio, "READ_BLOCK", 5000)  # many read blocks, resampled as a stream
    monkeypatch.setattr(audio, "ENCODE_FRAMES", 3)  # several Mimi calls
    codes, seconds = audio.encode_file(mimi, path)
    x, rate = sf.read(str(path), dtype="float32")
    x24 = soxr.resample(x, rate, 24000, quality="HQ").astype(np.float32)
    with torch.no_grad():  # Mimi's own one-shot encode pads the tail to a whole frame too
        whole = mimi.encode(torch.from_numpy(x24)[None, None])[0].numpy()
    np.testing.assert_array_equal(codes, whole)
    # and the codes decode through Mimi to audio of the input's length (up to the padded frame)
    decoded = audio.decode_codes(mimi, codes)
    assert decoded.shape == (codes.shape[1] * 1920,)
    assert 0 <= decoded.shape[0] - x24.shape[0] < 1920


def test_deterministic_and_trainable_as_codebooks(prepared, recordings, tmp_path):
    d, _ = recordings
    again = tmp_path / "again"
    assert cli_main(["prepare", "--audio", str(d / "*.wav"), "--mimi-random-init", "0",
                     "--out", str(again), "--quiet"]) == 0
    for f in sorted(prepared.glob("*.npy")):
        np.testing.assert_array_equal(np.load(f), np.load(again / f.name))
    from ttt_jax.moshi.config import MoshiDataConfig
    from ttt_jax.moshi.data import make_frames_dataset

    data = MoshiDataConfig(source="codebooks", path=str(prepared), seq_len=4, batch_size=2,
                           val_fraction=0.2)
    batch = make_frames_dataset(data, (2048,) * 8, seed=0, split="train").batch(0)
    assert batch.shape == (2, 5, 8)


def test_errors_are_one_line_naming_the_file_or_flag(recordings, tmp_path, capsys):
    d, _ = recordings
    silent = tmp_path / "silent"
    silent.mkdir()
    write_wav(silent / "quiet.wav", 16000, 1, 0.3, "silence")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.wav").write_bytes(b"RIFF not really a wave file")
    cases = [
        (["--audio", str(silent), "--mimi-random-init", "0"], "quiet.wav' is silent"),
        (["--audio", str(broken), "--mimi-random-init", "0"], "cannot read audio file"),
        (["--audio", str(d)], "needs exactly one of --mimi-weights FILE"),
        (["--audio", str(d), "--mimi-weights", str(tmp_path / "none.safetensors")],
         "--mimi-weights"),
        (["--audio", str(tmp_path / "nothing")], "does not exist"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert cli_main(["prepare", *argv, "--out", str(out), "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_text_stream_places_words_at_the_frame_rate():
    # bytes tokenizer: "hi" -> [104, 105], "ok" -> [111, 107]; 1.6 s -> 20 frames at 12.5 Hz.
    words = [("ok", (1.0, 1.05), "SPEAKER_MAIN"), ("hi", (0.0, 0.3), "SPEAKER_MAIN"),
             ("you", (0.5, 0.9), "OTHER"), ("gone", (0.7, 0.7), "SPEAKER_MAIN")]
    got = audio.text_stream(words, 20, lambda w: list(w.encode()))
    # "hi" starts in frame 0: its tokens fill frames 0-1; "you" is another speaker's and
    # "gone" has no duration; "ok" starts at 1.0 s = frame 12.5, so in frame 12 (the first
    # ending after it), and the padding frame before it becomes end-of-padding (0).
    pad = 3
    want = [104, 105] + [pad] * 9 + [0, 111, 107] + [pad] * 6
    assert got.tolist() == want


def test_text_row_from_timestamp_files(recordings, tmp_path, capsys):
    d, _ = recordings
    src = tmp_path / "in"
    src.mkdir()
    import shutil

    shutil.copy(d / "c_sweep24k.wav", src / "talk.wav")  # 0.45 s: 6 frames
    (src / "talk.json").write_text(json.dumps(
        {"alignments": [["yo", [0.1, 0.3], "SPEAKER_MAIN"]]}))
    out = tmp_path / "out"
    assert cli_main(["prepare", "--audio", str(src), "--mimi-random-init", "0", "--codebooks",
                     "2", "--text-tokenizer", "bytes", "--out", str(out), "--quiet"]) == 0
    codes = np.load(out / "00000.npy")
    assert codes.shape == (3, 6)
    assert codes[0].tolist() == [0, 121, 111, 3, 3, 3]  # "yo" from frame 1 (0.1 s = 1.25)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["text"]["row"] == 0 and meta["text"]["padding"] == 3
    (src / "talk.json").unlink()
    assert cli_main(["prepare", "--audio", str(src), "--mimi-random-init", "0",
                     "--text-tokenizer", "bytes", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "talk.json' does not exist" in capsys.readouterr().err
