"""The Moshi fine-tuning loss on ``MoshiLM`` outputs (docs/moshi.md, "MoshiLM").

The public Moshi fine-tuning recipe computes, per micro-batch,

    loss = CE_text + CE_audio

where each term is a weighted mean of token cross-entropies over the valid positions (the masks
of ``LMOutput``, which already exclude the positions the delays leave without a target and the
zero token ``-1``):

    CE = sum_i w_i * ce_i / sum_i w_i,       w_i = mask_i * (extra weight of token i)

- text: the extra weight is ``text_padding_weight`` where the target is one of the text
  padding ids (``existing_text_padding_id`` and ``existing_text_end_padding_id``; an id listed
  twice counts once), else 1;
- audio: the extra weight is ``first_codebook_weight_multiplier`` on the first codebook (the
  semantic one), else 1.

Targets at masked positions are replaced by 0 before the weights are computed (so a masked
position never matches a padding id with a non-zero weight), and masked logits (NaN where the
delays leave no prediction) are replaced by 0 before the softmax, so neither the loss nor its
gradient sees them. One deliberate difference: a term whose weights sum to 0 is 0 here, where
the reference divides by zero.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp

from ttt_jax.moshi.lm import LMOutput
from ttt_jax.moshi.lm_config import MoshiLMConfig

# The public recipe's defaults.
TEXT_PADDING_WEIGHT = 0.5
FIRST_CODEBOOK_WEIGHT_MULTIPLIER = 1.0


def loss_with_mask(logits, target, mask, *, mode: str,
                   first_codebook_weight_multiplier: float = 1.0,
                   text_padding_weight: float = 1.0,
                   text_padding_ids: Iterable[int] = ()) -> jax.Array:
    """Weighted mean cross-entropy of one modality.

    Args:
      logits: ``[B, K, T, V]`` (NaN allowed where ``mask`` is false).
      target: ``[B, K, T]`` int token ids.
      mask: ``[B, K, T]`` bool, the valid positions.
      mode: ``text`` or ``audio``.
      first_codebook_weight_multiplier: ``audio``: weight of codebook 0.
      text_padding_weight: ``text``: weight of targets in ``text_padding_ids``.
      text_padding_ids: ``text``: the padding ids.

    Returns:
      The scalar loss (float32).
    """
    if mode not in ("text", "audio"):
        raise ValueError(f"mode={mode!r} is invalid: expected 'text' or 'audio'")
    target = jnp.where(mask, target, 0)
    weights = mask.astype(jnp.float32)
    if mode == "audio":
        scale = jnp.ones((weights.shape[1],), jnp.float32).at[0].set(
            first_codebook_weight_multiplier)
        weights = weights * scale[None, :, None]
    else:
        for pad in sorted(set(int(i) for i in text_padding_ids)):
            weights = jnp.where(target == pad, weights * text_padding_weight, weights)
    logits = jnp.where(mask[..., None], logits.astype(jnp.float32), 0.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(weights > 0, ce * weights, 0.0))
    norm = jnp.sum(weights)
    return jnp.where(norm > 0, total / jnp.where(norm > 0, norm, 1.0), 0.0)


def moshi_lm_loss(cfg: MoshiLMConfig, out: LMOutput, codes, *,
                  text_padding_weight: float = TEXT_PADDING_WEIGHT,
                  first_codebook_weight_multiplier: float = FIRST_CODEBOOK_WEIGHT_MULTIPLIER
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(text + audio loss, {"text": ..., "audio": ...})`` of ``MoshiLM(cfg)(codes)``."""
    text = loss_with_mask(out.text_logits, codes[:, :1], out.text_mask, mode="text",
                          text_padding_weight=text_padding_weight,
                          text_padding_ids=(cfg.existing_text_padding_id,
                                            cfg.existing_text_end_padding_id))
    audio = loss_with_mask(out.logits, codes[:, 1:1 + cfg.dep_q], out.mask, mode="audio",
                           first_codebook_weight_multiplier=first_codebook_weight_multiplier)
    return text + audio, {"text": text, "audio": audio}
