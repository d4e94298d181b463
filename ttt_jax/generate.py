"""``ttt-jax generate``: sample text from a checkpoint, byte-level or with its tokenizer; or,
from a Moshi run, the model's side of a conversation.

  ttt-jax generate --checkpoint RUN_DIR[/STEP] --prompt "The " -n 200 \\
      [--temperature 0.8] [--top-k 0] [--top-p 1.0] [--seed 0] [--samples 1] [--tokenizer T]
  ttt-jax generate --checkpoint MOSHI_RUN (--input-codes FILE.npy | --input-wav FILE) \\
      --out OUT.npy [--mimi-weights FILE | --mimi-random-init SEED] [--temperature 0.8] \\
      [--top-k 250] [--temperature-text 0.7] [--top-k-text 25] [--seed 0]

A run trained on ``data.prepared`` uses the tokenizer recorded there (``meta.json`` and its
copy of the tokenizer file): the prompt is encoded with it and each sample decoded with it, and
``-n`` counts tokens. Other runs (and ``--tokenizer bytes``) encode the prompt as UTF-8 bytes
(token id = byte value), so the model needs ``vocab_size >= 256``; ``--tokenizer`` also takes a
``tokenizer.json`` or SentencePiece ``.model``. Each sample is printed as prompt + continuation
(undecodable bytes are shown as U+FFFD). ``--temperature 0`` is greedy. Only an architecture with the ``generate``
feature (``ttt_lm``) can generate. ``python -m ttt_jax.generate`` is the same command.

A run of ``architecture: moshi_lm`` generates with ``ttt_jax.moshi.gen.MoshiGen`` (moshi's
``LMGen``, docs/moshi.md "Streaming generation"): the user's audio codes, ``--input-codes`` (a
``[n_q - dep_q, T]`` ``.npy``, or a whole ``[n_q + 1, T]`` codes array whose user rows
``1 + dep_q ..`` are used) or ``--input-wav`` (encoded through Mimi: ``--mimi-weights FILE``,
or ``--mimi-random-init SEED`` for random weights, tests only), are fed frame by frame, and
the model's text and audio tokens ``[dep_q + 1, T]`` (text first, frame ``t`` beside the
user's frame ``t``) are written to ``--out`` (int32 ``.npy``). With Mimi loaded, the model's
audio is also decoded to ``OUT.wav`` (24 kHz mono). Sampling follows ``LMGen``'s defaults
(``--temperature 0.8 --top-k 250`` for audio, ``--temperature-text 0.7 --top-k-text 25``);
a temperature of 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ttt_jax.errors import UsageError

BYTE_VOCAB = 256
DEFAULT_N = 200
MOSHI_ARCHITECTURE = "moshi_lm"
MOSHI_TOP_K, MOSHI_TEMP_TEXT, MOSHI_TOP_K_TEXT = 250, 0.7, 25  # LMGen's defaults
# The flags only a moshi_lm run reads (None when not given).
MOSHI_FLAGS = ("--input-codes", "--input-wav", "--mimi-weights", "--mimi-random-init", "--out",
               "--temperature-text", "--top-k-text")
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
    p.add_argument("--prompt", default=None, help="text to continue (UTF-8); text runs")
    p.add_argument("-n", type=int, default=None,
                   help=f"tokens (bytes) to generate per sample (default {DEFAULT_N}); text runs")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 means greedy (a moshi_lm run: of the audio tokens)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens (0: off; default 0, a moshi_lm run "
                        f"{MOSHI_TOP_K} for the audio tokens)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--samples", type=int, default=1, help="independent samples, as one batch")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes', a tokenizer.json or a SentencePiece .model (default: the "
                        "run's data.prepared tokenizer, else bytes)")
    moshi = p.add_argument_group("moshi_lm runs (the model's side of a conversation)")
    moshi.add_argument("--input-codes", default=None, metavar="FILE.npy",
                       help="the user's audio codes: [n_q - dep_q, T], or a whole [n_q + 1, T] "
                            "codes array (text first) whose user rows are used")
    moshi.add_argument("--input-wav", default=None, metavar="FILE",
                       help="the user's audio, encoded through Mimi (needs --mimi-weights or "
                            "--mimi-random-init)")
    moshi.add_argument("--mimi-weights", default=None, metavar="FILE",
                       help="Mimi's .safetensors (nothing is downloaded); also decodes the "
                            "model's audio to OUT.wav")
    moshi.add_argument("--mimi-random-init", type=int, default=None, metavar="SEED",
                       help="Mimi with seeded RANDOM weights instead (tests and dry runs only)")
    moshi.add_argument("--out", default=None, metavar="OUT.npy",
                       help="where the generated codes [dep_q + 1, T] (text first) are written")
    moshi.add_argument("--temperature-text", type=float, default=None,
                       help=f"temperature of the text tokens (default {MOSHI_TEMP_TEXT}; 0 means "
                            f"greedy)")
    moshi.add_argument("--top-k-text", type=int, default=None,
                       help=f"keep the k most likely text tokens (default {MOSHI_TOP_K_TEXT}; 0: "
                            f"off)")


def run(args: argparse.Namespace) -> int:
    from ttt_jax import checkpoint, registry
    from ttt_jax.decode import Sampling

    if args.n is not None and args.n < 1:
        raise UsageError(f"-n {args.n}: expected a number of tokens >= 1")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: expected an int >= 1")
    saved = checkpoint.load_run(args.checkpoint)
    arch = registry.of(saved.config)
    if arch.name == MOSHI_ARCHITECTURE:
        return run_moshi(args, saved)
    for flag in MOSHI_FLAGS:
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise UsageError(f"{flag} is for architecture {MOSHI_ARCHITECTURE} runs: "
                             f"--checkpoint holds a run of architecture {arch.name!r}, which "
                             f"continues a --prompt")
    arch.require("generate", "--checkpoint")
    if args.prompt is None:
        raise UsageError("--prompt is required: the text to continue")
    args.n = DEFAULT_N if args.n is None else args.n
    sampling = Sampling(args.temperature, 0 if args.top_k is None else args.top_k, args.top_p)
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


def _moshi_user_codes(path: str, cfg) -> np.ndarray:
    """The user's codes ``[n_q - dep_q, T]`` int64 of ``--input-codes`` (module docstring)."""
    from pathlib import Path

    users, k = cfg.n_q - cfg.dep_q, cfg.num_codebooks
    if not Path(path).is_file():
        raise FileNotFoundError(f"--input-codes {path!r} does not exist: expected a .npy of the "
                                f"user's audio codes [n_q - dep_q = {users}, T]")
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is one clear line
        raise ValueError(f"--input-codes {path!r} is not a .npy array: {e}") from None
    want = (f"integer codes [n_q - dep_q = {users}, T] (the user's codebooks) or [n_q + 1 = "
            f"{k}, T] (text first; rows {cfg.dep_q + 1}..{cfg.n_q} are the user's), T >= 1")
    if codes.ndim != 2 or codes.shape[0] not in (users, k) or codes.shape[1] < 1 or not (
            np.issubdtype(codes.dtype, np.integer)):
        raise ValueError(f"--input-codes {path!r} holds {codes.dtype}{list(codes.shape)}: "
                         f"expected {want}")
    codes = codes.astype(np.int64)
    user = codes[cfg.dep_q + 1:] if codes.shape[0] == k else codes
    bad = (user < -1) | (user >= cfg.card)
    if bad.any():
        row, t = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"--input-codes {path!r}: user row {row}, frame {t} holds "
                         f"{int(user[row, t])}: expected audio ids in [0, model.card = "
                         f"{cfg.card}) or -1 (no input)")
    return user


def _moshi_mimi(args, cfg):
    """Mimi (or None without a Mimi flag), its random weights announced on stderr."""
    from ttt_jax.errors import optional_dependency
    from ttt_jax.prepare.audio import load_mimi

    if args.mimi_weights is None and args.mimi_random_init is None:
        if args.input_wav is not None:
            raise UsageError("--input-wav needs Mimi to encode it: pass --mimi-weights FILE (the "
                             "published weights) or --mimi-random-init SEED (random weights)")
        return None
    if args.mimi_weights is not None and args.mimi_random_init is not None:
        raise UsageError("--mimi-weights and --mimi-random-init exclude each other: pass one")
    with optional_dependency():
        mimi = load_mimi(args.mimi_weights, args.mimi_random_init,
                         max(cfg.n_q - cfg.dep_q, cfg.dep_q))
    if int(mimi.cardinality) != cfg.card:
        flag = "--mimi-weights" if args.mimi_weights is not None else "--mimi-random-init"
        raise ValueError(f"{flag}: Mimi's codebooks have {int(mimi.cardinality)} entries but "
                         f"the run's model.card = {cfg.card}: the run's audio tokens are not "
                         f"Mimi codes (drop the Mimi flag and use --input-codes)")
    if args.mimi_random_init is not None:
        print(f"warning: --mimi-random-init {args.mimi_random_init}: Mimi has RANDOM weights; "
              f"the codes of --input-wav and the decoded audio are meaningless (tests and dry "
              f"runs only)", file=sys.stderr)
    return mimi


def run_moshi(args: argparse.Namespace, saved) -> int:
    """``generate`` of a ``moshi_lm`` run (module docstring)."""
    from pathlib import Path

    import jax

    from ttt_jax.moshi.gen import MoshiGen

    cfg = saved.config.model
    for flag, given in (("--prompt", args.prompt is not None), ("-n", args.n is not None),
                        ("--top-p", args.top_p != 1.0), ("--tokenizer", args.tokenizer is not None),
                        ("--samples", args.samples != 1)):
        if given:
            raise UsageError(f"{flag} is for text runs: --checkpoint holds a "
                             f"{MOSHI_ARCHITECTURE} run, which answers --input-codes or "
                             f"--input-wav")
    if (args.input_codes is None) == (args.input_wav is None):
        raise UsageError("a moshi_lm run needs exactly one of --input-codes FILE.npy (the user's "
                         "audio codes) and --input-wav FILE (encoded through Mimi)")
    if args.out is None or not args.out.endswith(".npy"):
        raise UsageError(f"--out {args.out!r} is invalid: expected a FILE.npy for the generated "
                         f"codes [dep_q + 1, T]" if args.out is not None else
                         "--out FILE.npy is required: where the generated codes [dep_q + 1, T] "
                         "are written")
    temp, temp_text = args.temperature, (MOSHI_TEMP_TEXT if args.temperature_text is None
                                         else args.temperature_text)
    top_k = MOSHI_TOP_K if args.top_k is None else args.top_k
    top_k_text = MOSHI_TOP_K_TEXT if args.top_k_text is None else args.top_k_text
    for flag, value in (("--temperature", temp), ("--temperature-text", temp_text)):
        if not np.isfinite(value) or value < 0:
            raise UsageError(f"{flag} {value}: expected a number >= 0 (0: greedy)")
    for flag, value in (("--top-k", top_k), ("--top-k-text", top_k_text)):
        if value < 0:
            raise UsageError(f"{flag} {value}: expected an int >= 0 (0: off)")
    if args.input_wav is not None and not Path(args.input_wav).is_file():
        raise FileNotFoundError(f"--input-wav {args.input_wav!r} does not exist: expected an "
                                f"audio file")
    user = None if args.input_codes is None else _moshi_user_codes(args.input_codes, cfg)
    mimi = _moshi_mimi(args, cfg)
    if user is None:
        from ttt_jax.prepare.audio import encode_file

        codes, _ = encode_file(mimi, Path(args.input_wav))
        user = codes[:cfg.n_q - cfg.dep_q].astype(np.int64)
    gen = MoshiGen(cfg, saved.params, temp=temp, temp_text=temp_text, top_k=top_k,
                   top_k_text=top_k_text, use_sampling=True)
    out = gen.generate(user[None], jax.random.PRNGKey(args.seed))[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, out)
    print(f"wrote {args.out}: int32 codes {list(out.shape)} (text, then {cfg.dep_q} audio "
          f"codebooks) of {out.shape[1]} frames")
    if mimi is not None:
        import wave

        from ttt_jax.prepare.audio import SAMPLE_RATE, decode_codes

        mimi.set_num_codebooks(cfg.dep_q)
        pcm = decode_codes(mimi, out[1:])
        wav = str(Path(args.out).with_suffix(".wav"))
        with wave.open(wav, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
        print(f"wrote {wav}: the model's audio, {pcm.size / SAMPLE_RATE:.2f} s at "
              f"{SAMPLE_RATE} Hz" + (" (Mimi with RANDOM weights)"
                                     if args.mimi_random_init is not None else ""))
    return 0


def main(argv=None) -> int:
    from ttt_jax.cli import command_main

    return command_main("generate", argv, prog="python -m ttt_jax.generate")


if __name__ == "__main__":
    sys.exit(main())
