"""``ttt-jax generate``: sample text from a checkpoint, byte-level or with its tokenizer.

  ttt-jax generate --checkpoint RUN_DIR[/STEP] --prompt "The " -n 200 \\
      [--temperature 0.8] [--top-k 0] [--top-p 1.0] [--seed 0] [--samples 1] [--tokenizer T]

A run trained on ``data.prepared`` uses the tokenizer recorded there (``meta.json`` and its
copy of the tokenizer file): the prompt is encoded with it and each sample decoded with it, and
``-n`` counts tokens. Other runs (and ``--tokenizer bytes``) encode the prompt as UTF-8 bytes
(token id = byte value), so the model needs ``vocab_size >= 256``; ``--tokenizer`` also takes a
``tokenizer.json`` or SentencePiece ``.model``. Each sample is printed as prompt + continuation
(undecodable bytes are shown as U+FFFD). ``--temperature 0`` is greedy. Only an architecture with the ``generate``
feature (``ttt_lm``) can generate. ``python -m ttt_jax.generate`` is the same command.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ttt_jax.errors import UsageError

BYTE_VOCAB = 256
DESCRIPTION = __doc__.split(": ", 1)[1]


def text_to_ids(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as token ids ``[n]`` int32."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def ids_to_text(tokens) -> str:
    """Token ids (bytes) back to text; ids >= 256 or invalid UTF-8 become U+FFFD."""
    data = bytes(int(t) if 0 <= int(t) < BYTE_VOCAB else 0xFF for t in tokens)
    return data.decode("utf-8", errors="replace")


def generate_text(params, config, prompt: str, n: int, sampling, *, seed: int = 0,
                  samples: int = 1) -> list[str]:
    """``samples`` continuations of ``prompt`` (``n`` bytes each) from a byte-level TTT-LM.

    ``params`` are the model's variables (``{"params": ...}``), ``config`` its ``ModelConfig``,
    ``sampling`` a ``ttt_jax.decode.Sampling``.
    """
    from ttt_jax.decode import Decoder

    if config.vocab_size < BYTE_VOCAB:
        raise UsageError(f"the checkpoint's model has vocab_size={config.vocab_size}: byte-level "
                         f"text needs vocab_size >= {BYTE_VOCAB}")
    ids = text_to_ids(prompt)
    if ids.size == 0:
        raise UsageError("--prompt is empty: generation needs at least one byte to start from")
    tokens, _ = Decoder(config).generate(params, np.tile(ids, (samples, 1)), n,
                                         sampling=sampling, seed=seed)
    return [ids_to_text(row) for row in np.asarray(tokens)]


def run_tokenizer(config, override=None, run_dir=None):
    """The tokenizer of a run: ``override`` (``--tokenizer``), else the run directory's copy
    (``RUN_DIR/tokenizer/``, written by training on ``data.prepared``), else the one recorded
    by its ``data.prepared`` directory, else None (bytes)."""
    from ttt_jax.data.prepared import read_meta, run_tokenizer_meta
    from ttt_jax.prepare.tokenizers import from_meta, load_tokenizer

    if override is not None:
        return load_tokenizer(override)
    recorded = run_tokenizer_meta(run_dir) if run_dir is not None else None
    if recorded is not None:
        return from_meta(*recorded)
    data = config.data
    if data.source == "prepared" and data.prepared:
        return from_meta(read_meta(data.prepared), data.prepared)
    return None


def generate_with_tokenizer(params, config, tokenizer, prompt: str, n: int, sampling, *,
                            seed: int = 0, samples: int = 1) -> list[str]:
    """Like :func:`generate_text` with ``tokenizer`` (``ttt_jax.prepare.Tokenizer``): each
    sample is ``tokenizer.decode(prompt ids + n new ids)``, the prompt included."""
    from ttt_jax.decode import Decoder

    if config.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"the checkpoint's model has vocab_size={config.vocab_size}, fewer than "
                         f"the {tokenizer.vocab_size} ids of its {tokenizer.kind} tokenizer")
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if ids.size == 0:
        raise UsageError("--prompt is empty: generation needs at least one token to start from")
    tokens, _ = Decoder(config).generate(params, np.tile(ids, (samples, 1)), n,
                                         sampling=sampling, seed=seed)
    return [tokenizer.decode(list(ids) + [int(t) for t in row]) for row in np.asarray(tokens)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="RUN_DIR (latest step), RUN_DIR/STEP or RUN_DIR/checkpoints/STEP")
    p.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    p.add_argument("-n", type=int, default=200, help="tokens (bytes) to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely bytes (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--samples", type=int, default=1, help="independent samples, as one batch")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes', a tokenizer.json or a SentencePiece .model (default: the "
                        "run's data.prepared tokenizer, else bytes)")


def run(args: argparse.Namespace) -> int:
    from ttt_jax import checkpoint, registry
    from ttt_jax.decode import Sampling

    if args.n < 1:
        raise UsageError(f"-n {args.n}: expected a number of tokens >= 1")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: expected an int >= 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    saved = checkpoint.load_run(args.checkpoint)
    registry.of(saved.config).require("generate", "--checkpoint")
    tokenizer = run_tokenizer(saved.config, getattr(args, "tokenizer", None), saved.run_dir)
    if tokenizer is None or tokenizer.kind == "bytes":
        texts = generate_text({"params": saved.params}, saved.config.model, args.prompt, args.n,
                              sampling, seed=args.seed, samples=args.samples)
        texts = [args.prompt + text for text in texts]
    else:
        texts = generate_with_tokenizer({"params": saved.params}, saved.config.model, tokenizer,
                                        args.prompt, args.n, sampling, seed=args.seed,
                                        samples=args.samples)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)
    return 0


def main(argv=None) -> int:
    from ttt_jax.cli import command_main

    return command_main("generate", argv, prog="python -m ttt_jax.generate")


if __name__ == "__main__":
    sys.exit(main())
