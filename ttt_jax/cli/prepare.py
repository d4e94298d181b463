"""``ttt-jax prepare``: tokenize text into a directory that ``data.prepared`` trains on.

  ttt-jax prepare INPUT... --tokenizer {bytes,tokenizer.json,SP.model} --out DIR
      [--field text] [--val-fraction 0.01] [--seed 0] [--workers N] [--force]

INPUT is a text file, a .jsonl / .jsonl.gz file (one JSON object per line, the document is its
--field), a .parquet file (its --field column; needs pyarrow), a directory (walked recursively:
.txt/.md/.rst[.gz], .jsonl[.gz], .parquet), a glob, or a Hugging Face dataset saved with
save_to_disk (needs datasets). DIR gets train.bin and val.bin (flat uint16 ids, uint32 when the
vocabulary needs it), documents separated by the tokenizer's end-of-document id (or
--separator), meta.json and a copy of the tokenizer. A document goes to val by a hash of its
text (--val-fraction, --seed). The output appears only when complete; an existing DIR needs
--force. python -m ttt_jax.prepare is the same command.

  ttt-jax prepare --audio INPUT... --out DIR (--mimi-weights FILE | --mimi-random-init SEED)
      [--codebooks 8] [--device cpu] [--force]

With --audio, INPUT is .wav/.flac/.mp3/.ogg files, directories or globs; each file becomes
Mimi codes [K, T] at 12.5 Hz in DIR/NNNNN.npy (mono, resampled to 24 kHz, encoded in streaming
mode) with meta.json, which data.source: codebooks trains on; --text-tokenizer adds the text
stream of each file's FILE.json word timestamps as row 0. Mimi's weights come from
--mimi-weights (nothing is downloaded); --mimi-random-init builds it with random weights.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text/.jsonl/.jsonl.gz/.parquet files, directories, globs or a saved "
                        "Hugging Face dataset")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes', a Hugging Face tokenizer.json, or a SentencePiece .model "
                        "(required for text)")
    p.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    p.add_argument("--field", default="text", help="the text field of .jsonl/.parquet/datasets")
    p.add_argument("--text-unit", default="file", choices=("file", "paragraph", "line"),
                   help="what one document of a text file is (default: the whole file)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents (by hash) in val.bin")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val hash split")
    p.add_argument("--separator", type=int, default=None, metavar="ID",
                   help="id between documents (default: the tokenizer's end-of-document id)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="id dtype (auto: uint16 when the vocabulary fits)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    audio = p.add_argument_group("audio (--audio)")
    audio.add_argument("--audio", action="store_true",
                       help="the inputs are audio files: write Mimi codes instead of token ids")
    audio.add_argument("--mimi-weights", default=None, metavar="FILE",
                       help="Mimi's weights (.safetensors)")
    audio.add_argument("--mimi-random-init", type=int, default=None, metavar="SEED",
                       help="Mimi with random weights from this seed (tests, dry runs)")
    audio.add_argument("--codebooks", type=int, default=8, help="Mimi codebooks kept (K)")
    audio.add_argument("--device", default="cpu", help="torch device for Mimi (cpu, cuda)")
    audio.add_argument("--text-tokenizer", default=None, metavar="TOKENIZER",
                       help="add the text stream (row 0) from each file's FILE.json word "
                            "timestamps, tokenized with this (Moshi's SentencePiece .model)")
    audio.add_argument("--main-speaker", default="SPEAKER_MAIN",
                       help="the speaker label whose words go on the text stream")


def run_audio(args: argparse.Namespace) -> int:
    from ttt_jax.prepare.audio import AudioOptions, prepare_audio

    meta = prepare_audio(AudioOptions(
        inputs=tuple(args.inputs), out=args.out, mimi_weights=args.mimi_weights,
        mimi_random_init=args.mimi_random_init, codebooks=args.codebooks, device=args.device,
        force=args.force, progress=not args.quiet, text_tokenizer=args.text_tokenizer,
        main_speaker=args.main_speaker))
    frames = sum(f["frames"] for f in meta["files"])
    print(f"{args.out}: {len(meta['files'])} files, {meta['seconds'] / 3600:,.3f} h of audio, "
          f"{frames:,} frames of {meta['codebooks']} codebooks at {meta['frame_rate']} Hz")
    return 0


def run(args: argparse.Namespace) -> int:
    from ttt_jax.errors import UsageError
    from ttt_jax.prepare import PrepareOptions, prepare

    if args.audio:
        return run_audio(args)
    if args.tokenizer is None:
        raise UsageError("--tokenizer is required for text inputs: 'bytes', a tokenizer.json "
                         "or a SentencePiece .model (or pass --audio for audio files)")

    meta = prepare(PrepareOptions(
        inputs=tuple(args.inputs), out=args.out, tokenizer=args.tokenizer, field=args.field,
        text_unit=args.text_unit, val_fraction=args.val_fraction, seed=args.seed,
        separator=args.separator, dtype=args.dtype, workers=args.workers, force=args.force,
        progress=not args.quiet))
    s = meta["splits"]
    print(f"{args.out}: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} "
          f"documents), val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} documents); "
          f"{meta['tokenizer']['kind']} tokenizer, vocab {meta['vocab_size']:,}, {meta['dtype']}")
    if s["val"]["documents"] == 0:
        print("warning: val.bin is empty: raise --val-fraction or add documents, or set "
              "data.val_path to another prepared val.bin")
    return 0
