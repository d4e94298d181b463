"""One checkpoint (or several) through every evaluation the options ask for.

A checkpoint is read with :func:`ttt_jax.checkpoint.load_run` (``RUN_DIR``,
``RUN_DIR/checkpoints``, ``RUN_DIR/checkpoints/STEP`` or ``RUN_DIR/STEP``); what applies to it
follows from its architecture (:func:`ttt_jax.registry.of`), never from probing its config:

* loss by position and length: every architecture, on its own held-out data
  (:mod:`ttt_jax.evals.data`); in bits per byte too when the data is the byte corpus or a
  prepared corpus (which records the bytes of its splits); per stream (text and each predicted
  codebook) for ``moshi_lm``, whose recordings are streamed with the carried state;
* recall at distance: token LMs only (``data.source: recall``, or ``recall=True``);
* TTT inner-loss diagnostics: architectures with the ``diagnostics`` feature that have TTT
  layers (others are skipped with a note).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ttt_jax import registry
from ttt_jax.evals.data import HeldOut
from ttt_jax.evals.options import EvalOptions
from ttt_jax.evals.scoring import Scorer
from ttt_jax.evals.tasks import (default_recall_distances, evaluate_diagnostics, evaluate_lm,
                                 evaluate_recall)

# Architectures the planted-key recall task applies to (single-stream token LMs).
RECALL_ARCHITECTURES = ("ttt_lm", "attention_lm")
# Longest default sequence of the diagnostics.
DIAGNOSTICS_MAX_LENGTH = 4096


def default_label(path: str | Path) -> str:
    """The run directory's name of any checkpoint path."""
    p = Path(path).resolve()
    while p.name.isdigit() or p.name == "checkpoints":
        p = p.parent
    return p.name


def _describe_lm(cfg, ttt: bool) -> dict[str, Any]:
    m = cfg.model
    return {"seq_modeling": m.seq_modeling, "use_rope": m.ttt.use_rope,
            "rope_bounded": m.ttt.rope_bounded, "attention_window": m.attention_window,
            "mini_batch_size": m.ttt.mini_batch_size, "num_layers": m.num_layers,
            "model_dim": m.model_dim, "ttt_layers": list(range(m.num_layers)) if ttt else []}


def _describe_moshi(cfg) -> dict[str, Any]:
    m = cfg.model
    t = m.transformer
    return {"d_model": t.d_model, "num_layers": t.num_layers, "context": t.context,
            "ttt_layers": list(m.ttt_layers), "mini_batch_size": m.ttt.mini_batch_size,
            "use_rope": m.ttt.use_rope, "num_streams": m.num_streams,
            "vocab_sizes": list(m.vocab_sizes)}


def _describe_moshi_lm(cfg) -> dict[str, Any]:
    m = cfg.model
    t = m.transformer
    return {"d_model": t.d_model, "num_layers": t.num_layers, "context": t.context,
            "ttt_layers": list(m.temporal.ttt_layers), "mini_batch_size": m.ttt.mini_batch_size,
            "use_rope": m.ttt.use_rope, "rope_bounded": m.ttt.rope_bounded,
            "persistent_states": m.ttt.persistent_states, "n_q": m.n_q, "dep_q": m.dep_q,
            "delays": list(m.delays)}


# Per architecture: the model summary of the report; ``ttt_layers`` lists the TTT layers.
DESCRIBE = {"ttt_lm": lambda cfg: _describe_lm(cfg, ttt=True),
            "attention_lm": lambda cfg: _describe_lm(cfg, ttt=False),
            "moshi_ttt": _describe_moshi, "moshi_lm": _describe_moshi_lm}


def _check_applicable(arch, cfg, options: EvalOptions, path) -> None:
    """Refuses, before any computation, what does not apply to this checkpoint."""
    arch.require("eval", f"--checkpoint {str(path)!r}")
    if arch.name not in DESCRIBE:
        raise ValueError(f"--checkpoint {str(path)!r}: architecture {arch.name!r} has no "
                         f"evaluation here: expected one of {', '.join(sorted(DESCRIBE))}")
    if options.recall and arch.name not in RECALL_ARCHITECTURES:
        raise ValueError(f"recall=True (--recall) is invalid for checkpoint {str(path)!r}: the "
                         f"planted-key recall task needs a single-stream token LM "
                         f"({', '.join(RECALL_ARCHITECTURES)}), not architecture {arch.name!r}")


def _recall_trained(arch, cfg) -> bool:
    return arch.name in RECALL_ARCHITECTURES and cfg.data.source == "recall"


def _diagnostics_tokens(arch, cfg, heldout: HeldOut, length: int, count: int) -> np.ndarray:
    """The model inputs of the diagnostics: held-out data, or recall sequences for a model
    trained on recall."""
    if not _recall_trained(arch, cfg):
        return heldout.sequences(length, count)[:, :-1]
    from ttt_jax.data import recall_sequence

    rng = np.random.default_rng(1)
    return np.stack([recall_sequence(rng, length, length - 1,
                                     recall_vocab=cfg.data.recall_vocab).tokens[:-1]
                     for _ in range(count)])


def evaluate_checkpoint(path: str | Path, options: EvalOptions,
                        log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Everything ``options`` asks for, for one checkpoint: a JSON-ready dict with ``label``,
    ``step``, ``architecture``, ``model`` and, as they apply, ``lm`` (loss by length and
    position bucket), ``recall``, ``ttt_diagnostics`` and ``notes`` (what was skipped)."""
    from ttt_jax.checkpoint import load_run

    if not isinstance(options, EvalOptions):
        raise TypeError(f"options must be an EvalOptions, got {type(options).__name__}")
    run = load_run(path)
    cfg, arch = run.config, registry.of(run.config)
    _check_applicable(arch, cfg, options, path)
    label = default_label(path)
    model = DESCRIBE[arch.name](cfg)
    log(f"{label}: step {run.step}, architecture {arch.name}, "
        + ", ".join(f"{k}={v}" for k, v in model.items())
        + f"; trained at {cfg.data.seq_len} on {cfg.data.source}")
    scorer = Scorer(arch, cfg.model, run.params, options.chunk)
    result: dict[str, Any] = {
        "label": label, "checkpoint": str(path), "step": run.step, "architecture": arch.name,
        "train_seq_len": cfg.data.seq_len, "data_source": cfg.data.source,
        "chunk": options.chunk, "model": model, "notes": []}

    def note(text: str) -> None:
        result["notes"].append(text)
        log(f"  note: {text}")

    heldout = HeldOut(cfg)
    recall_trained = _recall_trained(arch, cfg)
    if not recall_trained:
        sequences = heldout.sequences(options.longest, options.num_sequences)
        result["lm"] = evaluate_lm(scorer, sequences, options.lengths, options.batch,
                                   heldout.bytes_per_token, log)
    if recall_trained or options.recall:
        distances = options.recall_distances or default_recall_distances(cfg.data.seq_len)
        vocab = cfg.data.recall_vocab if recall_trained else min(64, cfg.model.vocab_size)
        result["recall"] = evaluate_recall(scorer, distances, options.recall_samples, vocab,
                                           options.batch, cfg.data.seq_len, log=log)
    if options.ttt_diagnostics:
        if not arch.supports("diagnostics") or not model["ttt_layers"]:
            note(f"no TTT layers in this {arch.name} model: no inner-loss diagnostics")
        else:
            length = options.diagnostics_length or min(options.longest, DIAGNOSTICS_MAX_LENGTH)
            tokens = _diagnostics_tokens(arch, cfg, heldout, length,
                                         options.diagnostics_sequences)
            result["ttt_diagnostics"] = diag = evaluate_diagnostics(
                scorer.model, run.params, tokens, model["mini_batch_size"])
            log("  inner loss (w0 / before / after): " + "; ".join(
                f"layer {i} {d['w0']:.3f} / {d['before']:.3f} / {d['after']:.3f}"
                for i, d in enumerate(diag["mean"])))
    return result


def evaluate_checkpoints(paths: Sequence[str | Path], options: EvalOptions,
                         log: Callable[[str], Any] = print) -> dict[str, Any]:
    """:func:`evaluate_checkpoint` of every path: the report that ``write_report`` writes.
    Two checkpoints of one run are labelled ``RUN@STEP``."""
    if not paths:
        raise ValueError("--checkpoint: expected at least one checkpoint")
    results = [evaluate_checkpoint(p, options, log) for p in paths]
    labels = [r["label"] for r in results]
    if len(set(labels)) != len(labels):
        for r in results:
            r["label"] = f"{r['label']}@{r['step']}"
    return {"lengths": list(options.lengths), "num_sequences": options.num_sequences,
            "chunk": options.chunk, "options": options.to_dict(), "models": results}
