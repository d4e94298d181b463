"""The Moshi-TTT hybrid in the architecture registry (``architecture: moshi_ttt``).

Param groups for the optimizer (``param_group``): ``alpha`` (every ``forward_ssm_gating``),
``ttt`` (everything else under a ``seq_modeling_block``) and ``backbone`` (the rest), with the
learning-rate multipliers ``ttt.weight_lr_multiplier`` / ``ttt.alpha_lr_multiplier``;
``ttt.freeze_backbone`` freezes the backbone group. A Moshi backbone enters a run through
``checkpoint.init_from``: convert its weights into a run directory first with
``ttt-jax import --in moshi.safetensors --config CONFIG --out RUN_DIR``; ``ttt-jax export``
writes a run back to PyTorch names (``ttt_jax.moshi.export``).

``moshi_lm`` is Moshi's whole ``LMModel`` (``ttt_jax.moshi.lm``) with the same graft and the
same param groups, trained on the Moshi fine-tuning loss (``lm_loss.py``): the dataset's frames
``[B, T, K]`` are the codes, and each micro-batch's loss is ``text + audio`` (averaged over
micro-batches). Its export writes ``LMModel`` state-dict files (``lm_convert.save_lm``).
With ``ttt.persistent_states`` it trains on recordings read in order and carries the temporal
transformer's state from one step to the next in ``TrainState.carry`` (``loss_sums_carry``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ttt_jax.moshi.config import MoshiRunConfig, MoshiTTTConfig
from ttt_jax.moshi.data import make_frames_dataset, make_recording_windows
from ttt_jax.moshi.hybrid import MoshiTTTLM
from ttt_jax.moshi.lm import ZERO_TOKEN_ID, LMOutput, MoshiLM
from ttt_jax.moshi.lm_config import MoshiLMConfig, MoshiLMRunConfig
from ttt_jax.moshi.lm_loss import moshi_lm_loss
from ttt_jax.nn.lora import LoRAConfig, is_lora_path, merge
from ttt_jax.moshi.sharding import MOSHI_RULES, layer_working_set
from ttt_jax.registry import Architecture, register
from ttt_jax.sharding import register_rules
from ttt_jax.training import OwnObjective

GROUPS = ("backbone", "ttt", "alpha", "lora")


def param_group(path: str) -> str:
    """``alpha``, ``ttt``, ``lora`` (an adapter's ``lora_a`` / ``lora_b``) or ``backbone``
    for an ``a/b/c`` param path."""
    parts = path.split("/")
    if "forward_ssm_gating" in parts:
        return "alpha"
    if "seq_modeling_block" in parts:
        return "ttt"
    if is_lora_path(path):
        return "lora"
    return "backbone"


def sample_tokens(cfg: MoshiTTTConfig, batch: int, length: int):
    """Zero token ids of the model's input shape ``[B, T, K]``."""
    return jnp.zeros((batch, length, cfg.num_streams), jnp.int32)


def build_datasets(cfg: MoshiRunConfig):
    """Train and validation frame datasets."""
    common = dict(vocab_sizes=cfg.model.vocab_sizes, seed=cfg.train.seed)
    return (make_frames_dataset(cfg.data, split="train", **common),
            make_frames_dataset(cfg.data, split="val", **common))


def lr_scales(cfg: MoshiRunConfig) -> dict[str, float]:
    ttt = cfg.model.ttt
    return {"backbone": 1.0, "ttt": ttt.weight_lr_multiplier, "alpha": ttt.alpha_lr_multiplier,
            "lora": 1.0}


def frozen_groups(cfg: MoshiRunConfig) -> tuple[str, ...]:
    """The backbone with ``ttt.freeze_backbone``, or with LoRA on and ``lora.freeze_base``
    (then the adapters, the TTT layers and their alphas train)."""
    lora = cfg.model.lora
    frozen = cfg.model.ttt.freeze_backbone or (lora.enable and lora.freeze_base)
    return ("backbone",) if frozen else ()


def without_lora(cfg, params):
    """``(model config, params)`` for export: adapters merged into their kernels and LoRA off
    in the config (the exported model is the plain one computing the same function)."""
    if not cfg.lora.enable:
        return cfg, params
    return dataclasses.replace(cfg, lora=LoRAConfig()), merge(params, cfg.lora.scaling)


def _exact_float32(cfg, params, dtype, name: str):
    """The model config and params an export writes (LoRA merged); only float32 is written
    (the Moshi exports are exact, so ``allow_inexact`` changes nothing)."""
    if dtype not in (None, "float32"):
        raise ValueError(f"--dtype {dtype} is invalid: a {name} export is float32")
    ttt = cfg.model.ttt
    if ttt.enable and ttt.use_rope and not ttt.rope_bounded:
        raise ValueError("ttt.rope_bounded=false cannot be exported: the Moshi-TTT layers "
                         "rotate by position % mini_batch_size (the ablation stays in JAX)")
    return without_lora(cfg.model, params)


def export_torch(cfg: MoshiRunConfig, params, out, *, dtype=None, force=False,
                 allow_inexact=False, key="the model") -> str:
    """moshi's names for the backbone, the Moshi-TTT names for the TTT layers (float32)."""
    from ttt_jax.moshi.export import CONFIG_NAME, WEIGHTS_NAME, save_torch

    del allow_inexact, key
    save_torch(*_exact_float32(cfg, params, dtype, "moshi_ttt"), out, force=force)
    return f"wrote {out / WEIGHTS_NAME} and {out / CONFIG_NAME}"


MOSHI_TTT = register(Architecture(
    name="moshi_ttt", run_config=MoshiRunConfig, build_model=MoshiTTTLM,
    sample_input=sample_tokens, build_datasets=build_datasets,
    features=frozenset({"diagnostics", "eval", "export", "mesh"}),
    export=export_torch,
    param_group=param_group, lr_scales=lr_scales, frozen_groups=frozen_groups,
    description="Moshi's streaming transformer with TTT layers grafted in"))
# Mesh runs: the Moshi param sharding rules (ttt_jax/moshi/sharding.py).
register_rules("moshi_ttt", MOSHI_RULES, layer_working_set)


class MoshiLMObjective(MoshiLM, OwnObjective):
    """``MoshiLM`` (same params) on frames ``[B, T, K]``, the data's layout (``MoshiLM`` itself
    takes moshi's ``[B, K, T]``), trained on the Moshi fine-tuning loss of ``lm_loss.py``."""

    def __call__(self, frames):
        return super().__call__(jnp.swapaxes(frames, 1, 2))

    def _loss(self, out: LMOutput, codes):
        cfg = self.config
        loss, _ = moshi_lm_loss(cfg, out, codes, text_padding_weight=cfg.text_padding_weight,
                                first_codebook_weight_multiplier=(
                                    cfg.first_codebook_weight_multiplier))
        return loss, jnp.ones((), jnp.float32)

    def loss_sums(self, tokens, mask):
        """``(text + audio loss, 1)`` of frames ``tokens [B, T, K]`` (``mask`` is unused)."""
        del mask
        return self._loss(self(tokens), jnp.swapaxes(tokens, 1, 2))  # codes [B, K, T]

    @property
    def persistent_states(self) -> bool:
        """Trained on consecutive windows with the carried state (``ttt.persistent_states``)."""
        return self.config.ttt.persistent_states

    def loss_sums_carry(self, tokens, mask, carry):
        """``((text + audio loss, 1), carry')`` of delayed windows ``tokens [B, T + 1, K]``
        (``RecordingWindows``) continuing the streams in ``carry`` (``MoshiLM.stream_window``).

        The same loss as ``loss_sums`` over the same predictions, in delayed coordinates: a
        target is counted unless it is a stream's initial token (a frame before the stream
        begins) or the zero token ``-1``."""
        del mask
        q = 1 + self.config.dep_q
        window = jnp.swapaxes(tokens, 1, 2)  # [B, K, T + 1]
        text_logits, audio_logits, carry = self.stream_window(window, carry)
        target = window[:, :, 1:]
        initial = jnp.asarray(self.initial_ids, target.dtype)[None, :, None]
        valid = (target != initial) & (target != ZERO_TOKEN_ID)
        out = LMOutput(audio_logits, valid[:, 1:q], text_logits, valid[:, :1])
        return self._loss(out, target), carry


def sample_frames(cfg: MoshiLMConfig, batch: int, length: int):
    """Zero frames of the training model's input shape ``[B, T, K]``."""
    return jnp.zeros((batch, length, cfg.num_codebooks), jnp.int32)


def lm_vocab_sizes(cfg: MoshiLMConfig) -> tuple[int, ...]:
    """The token range of every stream in the data (text first)."""
    return (min(cfg.text_card, cfg.text_vocab_out),) + (cfg.card,) * cfg.n_q


def build_lm_datasets(cfg: MoshiLMRunConfig):
    """Train and validation frame datasets of ``n_q + 1`` streams. With
    ``ttt.persistent_states`` the train data reads each recording in order as delayed windows
    (``RecordingWindows``); validation always scores independent windows from a fresh state."""
    common = dict(vocab_sizes=lm_vocab_sizes(cfg.model), seed=cfg.train.seed)
    if cfg.model.ttt.persistent_states:
        train = make_recording_windows(cfg.data, split="train", delays=cfg.model.delays,
                                       initial=cfg.model.initial_ids, **common)
    else:
        train = make_frames_dataset(cfg.data, split="train", **common)
    return train, make_frames_dataset(cfg.data, split="val", **common)


def export_lm(cfg: MoshiLMRunConfig, params, out, *, dtype=None, force=False,
              allow_inexact=False, key="the model") -> str:
    """``LMModel`` keys in ``model.safetensors``, the TTT layers in ``ttt.safetensors``."""
    from ttt_jax.moshi.lm_convert import CONFIG_NAME, MODEL_NAME, TTT_NAME, save_lm

    del allow_inexact, key
    save_lm(*_exact_float32(cfg, params, dtype, "moshi_lm"), out, force=force)
    ttt = f", {out / TTT_NAME}" if cfg.model.temporal.ttt_layers else ""
    return f"wrote {out / MODEL_NAME}{ttt} and {out / CONFIG_NAME}"


MOSHI_LM = register(Architecture(
    name="moshi_lm", run_config=MoshiLMRunConfig, build_model=MoshiLMObjective,
    sample_input=sample_frames, build_datasets=build_lm_datasets,
    features=frozenset({"eval", "export", "mesh"}), export=export_lm,
    param_group=param_group, lr_scales=lr_scales, frozen_groups=frozen_groups,
    description="Moshi's whole LMModel (text + audio streams, depformer) with TTT layers "
                "grafted into its temporal transformer"))
register_rules("moshi_lm", MOSHI_RULES, layer_working_set)
