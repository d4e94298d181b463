"""``ttt-jax prepare --audio``: audio files -> Mimi codes, one ``[K, T]`` ``.npy`` per file.

Each input (``.wav``, ``.flac``, ``.mp3``, ``.ogg``; directories are walked recursively, globs
expanded) is read in blocks (``soundfile``), mixed down to mono, resampled to Mimi's 24 kHz as
a stream (``soxr``), and fed to Mimi (the real codec of the ``moshi`` package, PyTorch, CPU or
CUDA) in streaming mode, one block at a time: memory stays bounded whatever the file's length.
The file's last partial frame is zero-padded to a whole one, so a file of ``S`` samples at 24
kHz gives ``T = ceil(S / 1920)`` frames (12.5 Hz), as Mimi's own one-shot ``encode`` does.

The output directory holds ``00000.npy``, ``00001.npy``, ... (``uint16`` codes ``[K, T]``, in the
order of the sorted inputs) and ``meta.json`` (sample rate, frame rate, codebooks, Mimi's
weights and their sha256, and per file its path, frames and seconds): it is what
``data.source: codebooks`` with ``data.path: DIR`` trains on. Like the text prepare, it is
written to a hidden sibling and renamed into place when complete.

With ``--text-tokenizer`` (Moshi's SentencePiece ``.model``, or any tokenizer ``prepare``
takes), each file's word timestamps, ``FILE.json`` beside it (``{"alignments": [[word, [start,
end], speaker], ...]}``, the Moshi fine-tuning format), become a text stream on the first row,
``[1 + K, T]``, placed at the frame rate as Moshi's fine-tuning data has it
(``text_stream``): every frame starts as the padding id (3), a word's tokens go one per frame
from the first frame ending after its start, the padding frame just before them becomes the
end-of-padding id (0), and only the main speaker's words are kept.

Mimi's weights come from ``--mimi-weights FILE`` (the published ``.safetensors``); nothing is
downloaded. ``--mimi-random-init SEED`` builds Mimi from the package's own configuration with
seeded random weights instead: codes with the right shapes and rates, for tests and dry runs.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SIZE = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples per frame
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
# Samples read (at the file's rate) and frames encoded per block.
READ_BLOCK = 1 << 18
ENCODE_FRAMES = 125  # 10 s of audio per Mimi call
FORMAT = "ttt-jax-audio-codes"
SILENCE = 1e-4  # a file whose peak amplitude stays below this is refused as silent
# Moshi's text stream: the padding id and the end-of-padding id (LMModel's
# existing_text_padding_id / existing_text_end_padding_id), and the main speaker's label.
TEXT_PADDING = 3
TEXT_END_OF_PADDING = 0
MAIN_SPEAKER = "SPEAKER_MAIN"
_INSTALL = "pip install 'ttt-jax[audio]' (soundfile, soxr, torch, moshi)"


@dataclasses.dataclass(frozen=True)
class AudioOptions:
    """What ``ttt-jax prepare --audio`` does (the command's flags).

    Attributes:
      inputs: audio files, directories (walked recursively) or globs.
      out: the output directory.
      mimi_weights: the Mimi ``.safetensors`` (or moshi ``.pt``) file.
      mimi_random_init: build Mimi with random weights from this seed instead (tests).
      codebooks: ``K``, the number of Mimi codebooks kept (Moshi uses 8).
      device: ``cpu`` or ``cuda``.
      force: replace an existing output.
      progress: draw the progress line on stderr.
    """

    inputs: Sequence[str]
    out: str
    mimi_weights: Optional[str] = None
    mimi_random_init: Optional[int] = None
    codebooks: int = 8
    device: str = "cpu"
    force: bool = False
    progress: bool = True
    text_tokenizer: Optional[str] = None
    main_speaker: str = MAIN_SPEAKER


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"--audio needs the {module} package: {_INSTALL}") from None


def audio_files(inputs: Sequence[str]) -> list[Path]:
    """The audio files that ``inputs`` name, in order (each directory's files sorted)."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES
                           and f.is_file())
            if not files:
                raise ValueError(f"{item!r} holds no audio file ({', '.join(AUDIO_SUFFIXES)})")
            found += files
        elif p.is_file():
            if p.suffix.lower() not in AUDIO_SUFFIXES:
                raise ValueError(f"{item!r} is not an audio file: expected one of "
                                 f"{', '.join(AUDIO_SUFFIXES)}")
            found.append(p)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True)
                             if Path(m).suffix.lower() in AUDIO_SUFFIXES)
            if not matches:
                raise ValueError(f"{item!r} matches no audio file")
            found += matches
        else:
            raise FileNotFoundError(f"{item!r} does not exist: expected an audio file, a "
                                    f"directory or a glob")
    return found


def read_mono(path: Path) -> tuple[Iterator[np.ndarray], int, int]:
    """``(blocks, sample rate, frames)``: float32 mono blocks of the file, read lazily."""
    sf = _need("soundfile")
    try:
        handle = sf.SoundFile(str(path))
    except Exception as e:  # noqa: BLE001 -- any decoder failure is one clear line
        raise ValueError(f"cannot read audio file {str(path)!r}: {e}") from None

    def blocks():
        with handle:
            try:
                for block in handle.blocks(blocksize=READ_BLOCK, dtype="float32",
                                           always_2d=True):
                    yield block.mean(axis=1)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot read audio file {str(path)!r}: {e}") from None

    return blocks(), int(handle.samplerate), int(handle.frames)


def resampled(blocks: Iterator[np.ndarray], rate: int) -> Iterator[np.ndarray]:
    """The blocks at 24 kHz (``soxr``'s streaming resampler; unchanged at 24 kHz)."""
    if rate == SAMPLE_RATE:
        yield from blocks
        return
    soxr = _need("soxr")
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    for block in blocks:
        yield stream.resample_chunk(block, last=False)
    yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


def load_mimi(weights: Optional[str], random_init: Optional[int], codebooks: int,
              device: str = "cpu"):
    """Mimi from the ``moshi`` package: the given weights, or seeded random ones."""
    if (weights is None) == (random_init is None):
        raise ValueError("--audio needs exactly one of --mimi-weights FILE (the published Mimi "
                         "weights; nothing is downloaded) and --mimi-random-init SEED (random "
                         "weights, for tests)")
    torch = _need("torch")
    _need("moshi")
    from moshi.models import loaders

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--mimi-weights {weights!r} does not exist")
    if not 1 <= codebooks <= 32:
        raise ValueError(f"--codebooks {codebooks} is invalid: expected 1 to 32 (Mimi has 32)")
    if random_init is not None:
        torch.manual_seed(random_init)
    try:
        return loaders.get_mimi(weights, device=device, num_codebooks=codebooks)
    except Exception as e:  # noqa: BLE001 -- a wrong file is one clear line
        raise ValueError(f"--mimi-weights {weights!r} is not a Mimi checkpoint: {e}") from None


def encode_file(mimi, path: Path, on_seconds=None) -> tuple[np.ndarray, float]:
    """``(codes uint16 [K, T], seconds at 24 kHz)`` of one file, encoded in streaming mode.

    ``on_seconds(s)`` is called with the seconds of audio encoded so far (progress)."""
    import torch

    blocks, rate, _ = read_mono(path)
    step = ENCODE_FRAMES * FRAME_SIZE
    device = next(mimi.parameters()).device
    pending = np.zeros(0, np.float32)
    parts, samples, peak = [], 0, 0.0

    def encode(x: np.ndarray):
        with torch.no_grad():
            codes = mimi.encode(torch.from_numpy(x).to(device)[None, None])
        parts.append(codes[0].cpu().numpy().astype(np.uint16))

    with mimi.streaming(batch_size=1):
        for block in resampled(blocks, rate):
            if block.size:
                peak = max(peak, float(np.abs(block).max()))
                samples += block.size
                pending = np.concatenate([pending, block])
            while pending.size >= step:
                encode(pending[:step])
                pending = pending[step:]
                if on_seconds is not None:
                    on_seconds(samples / SAMPLE_RATE)
        if pending.size:
            tail = math.ceil(pending.size / FRAME_SIZE) * FRAME_SIZE
            encode(np.pad(pending, (0, tail - pending.size)))
    if samples == 0:
        raise ValueError(f"audio file {str(path)!r} is empty (0 samples)")
    if peak < SILENCE:
        raise ValueError(f"audio file {str(path)!r} is silent (peak amplitude {peak:.2g} < "
                         f"{SILENCE}): remove it from the inputs")
    return np.concatenate(parts, axis=1), samples / SAMPLE_RATE


def text_stream(alignments, frames: int, encode, *, frame_rate: float = FRAME_RATE,
                padding: int = TEXT_PADDING, end_of_padding: int = TEXT_END_OF_PADDING,
                main_speaker: str = MAIN_SPEAKER) -> np.ndarray:
    """The text row ``[frames]`` of a file's word timestamps (module docstring).

    Args:
      alignments: ``[(word, (start, end), speaker), ...]`` in seconds.
      frames: ``T``, the audio's frame count.
      encode: ``str -> list[int]``, the text tokenizer (each word encoded on its own).
    """
    words = sorted(((w, (float(a), float(b)), spk) for w, (a, b), spk in alignments),
                   key=lambda x: x[1][0])
    words = [(encode(w.strip()), ts) for w, ts, spk in words if spk == main_speaker
             and ts[0] < ts[1]]
    out = np.full(frames, padding, np.int64)
    queue: list[int] = []
    i = 0
    for t in range(frames):  # frames inside a word after its tokens stay padding
        while i < len(words) and words[i][1][0] * frame_rate < t + 1:
            queue = list(words[i][0])  # a later word replaces what is left of an earlier one
            i += 1
        if queue:
            if t > 0 and out[t - 1] == padding:
                out[t - 1] = end_of_padding
            out[t] = queue.pop(0)
    return out


def read_alignments(path: Path):
    """The word timestamps of an audio file: ``alignments`` of ``FILE.json`` beside it."""
    info = path.with_suffix(".json")
    if not info.is_file():
        raise FileNotFoundError(f"{str(info)!r} does not exist: --text-tokenizer needs the word "
                                f"timestamps of every audio file ({{\"alignments\": [[word, "
                                f"[start, end], speaker], ...]}})")
    try:
        data = json.loads(info.read_text())
        out = [(str(w), (float(ts[0]), float(ts[1])), str(spk))
               for w, ts, spk in data["alignments"]]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{str(info)!r} is not a word-timestamp file: expected {{\"alignments\":"
                         f" [[word, [start, end], speaker], ...]}} ({type(e).__name__}: {e})") \
            from None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Progress:
    """``prepare --audio: F/N files, H h of audio, X audio-hours/s``, redrawn on stderr."""

    def __init__(self, files: int, stream, enabled: bool):
        self.files, self.stream, self.enabled = files, stream, enabled
        self.start = self.last = time.perf_counter()
        self.done_files, self.done_seconds = 0, 0.0

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        hours = self.done_seconds / 3600
        return (f"prepare --audio: {self.done_files}/{self.files} files, {hours:,.3f} h of "
                f"audio, {hours / elapsed:,.4f} audio-hours/s")

    def update(self, seconds_in_file: float, base: float) -> None:
        self.done_seconds = base + seconds_in_file
        now = time.perf_counter()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            self.stream.write("\r" + self.line() + " ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + f" in {time.perf_counter() - self.start:,.1f}s\n")
            self.stream.flush()


def prepare_audio(opts: AudioOptions, stream=None) -> dict:
    """Runs ``prepare --audio``; returns its ``meta.json`` contents. Errors are ``ValueError``
    / ``FileNotFoundError`` / ``FileExistsError`` in one line naming the flag or file."""
    stream = sys.stderr if stream is None else stream
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a directory")
    if out.exists() and not opts.force:
        raise FileExistsError(f"--out {str(out)!r} already exists: pass --force to replace it")
    files = audio_files(opts.inputs)
    tokenizer = None
    if opts.text_tokenizer is not None:
        from ttt_jax.prepare.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(opts.text_tokenizer)
        for path in files:  # every timestamp file is checked before any audio is encoded
            read_alignments(path)
    mimi = load_mimi(opts.mimi_weights, opts.mimi_random_init, opts.codebooks, opts.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    progress = _Progress(len(files), stream, opts.progress)
    records, total = [], 0.0
    try:
        for i, path in enumerate(files):
            codes, seconds = encode_file(mimi, path, lambda s: progress.update(s, total))
            if tokenizer is not None:
                text = text_stream(read_alignments(path), codes.shape[1], tokenizer.encode,
                                   main_speaker=opts.main_speaker)
                if text.max(initial=0) >= 1 << 16:
                    raise ValueError(f"--text-tokenizer {opts.text_tokenizer!r} gives ids "
                                     f"beyond uint16 for {str(path)!r}")
                codes = np.concatenate([text[None].astype(np.uint16), codes])
            name = f"{i:05d}.npy"
            np.save(tmp / name, codes)
            records.append({"file": name, "path": str(path.resolve()),
                            "frames": int(codes.shape[1]), "seconds": seconds})
            total += seconds
            progress.done_files = i + 1
            progress.update(0.0, total)
        progress.close()
        meta = {
            "format": FORMAT, "version": 1, "sample_rate": SAMPLE_RATE,
            "frame_rate": FRAME_RATE, "frame_size": FRAME_SIZE, "codebooks": opts.codebooks,
            "card": int(mimi.cardinality), "dtype": "uint16",
            "mimi": ({"weights": str(Path(opts.mimi_weights).resolve()),
                      "sha256": _sha256(Path(opts.mimi_weights))}
                     if opts.mimi_weights else {"random_init": opts.mimi_random_init}),
            "files": records, "seconds": total,
            "text": ({"tokenizer": tokenizer.describe(), "sha256": tokenizer.sha256,
                      "padding": TEXT_PADDING, "end_of_padding": TEXT_END_OF_PADDING,
                      "main_speaker": opts.main_speaker, "row": 0} if tokenizer else None),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def decode_codes(mimi, codes: np.ndarray) -> np.ndarray:
    """float32 mono audio at 24 kHz of ``codes`` ``[K, T]``: ``T * 1920`` samples."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(codes, np.int64))[None]
        return mimi.decode(x)[0, 0].cpu().numpy()
