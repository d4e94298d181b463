"""The model sections of a run config: the TTT layer and the TTT-LM (docs/architecture.md §1-2)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, get_args

from ttt_jax.config.checks import _check_bools, _check_choice, _check_int, _check_positive, _fail

TTTLayerType = Literal["linear", "mlp"]
RopeLayout = Literal["interleaved", "half"]
DType = Literal["float32", "bfloat16"]
SeqModeling = Literal["ttt", "swa"]

# The width of TTT-MLP's hidden layer, in multiples of the head dim (docs/architecture.md §1.5).
MLP_EXPANSION = 4
# The span length per inner model when ``seq_chunk`` is not set (docs/architecture.md §1.9).
DEFAULT_SPANS = {"linear": 1024, "mlp": 2048}


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """The TTT layer (docs/architecture.md §1).

    Attributes:
      model_dim: width ``d`` of the layer's input and output.
      num_heads: number of heads ``H``; ``head_dim = model_dim // num_heads``.
      mini_batch_size: ``b``, tokens per inner gradient step (also the RoPE table size).
      ttt_layer_type: inner model, ``linear`` (TTT-Linear) or ``mlp`` (TTT-MLP, hidden 4f).
      use_rope: rotate XQ and XK by ``position % mini_batch_size``. Off by default.
      rope_theta: RoPE base period.
      rope_layout: ``interleaved`` pairs ``(2k, 2k+1)`` or ``half`` pairs ``(k, k + f/2)``.
      rope_bounded: with ``use_rope``, rotate by ``position % mini_batch_size`` (true, the
        default) or by the plain absolute position (false: an ablation that lets RoPE
        extrapolate past the training length; ttt-lm-pytorch always bounds).
      qk_l2_norm: L2-normalise XQ and XK over the head dim before RoPE.
      ttt_base_lr: the inner learning-rate scale.
      share_qk: one shared Q/K projection followed by two causal depthwise convs.
      conv_kernel: kernel size of those convs (and of the model's pre-conv).
      use_gate: multiply the output by ``gelu_tanh(x Wg)`` before ``o_proj``.
      scan_checkpoint_group: in the backward pass keep the inner state only every this many
        mini-batches and recompute the rest (0 or 1: keep it at every mini-batch). Each
        mini-batch step is recomputed once in the backward pass whatever the group, so the
        group is only a memory setting. None (the default): ``ttt_jax.math.ttt.auto_group``,
        a divisor of the mini-batch count near ``sqrt(mini-batches * state size /
        per-mini-batch residuals)``, which keeps the least memory (16 at 128 mini-batches of
        f = 64; the reference implementations use 4): TTT-MLP's fwd+bwd at L=2048 takes 0.77x
        the memory of groups of 4 and is no slower (benchmarks/README.md).
      seq_chunk: a sequence longer than this many tokens goes through the layer in spans of
        this length, one after the other, the inner state (and the Q/K conv's last inputs)
        carried from span to span: the same outputs as the whole sequence at once, but the
        projections' arrays stay the size of a span, so the time per token stays flat at long
        lengths and the memory is lower (benchmarks/README.md). Rounded down to a multiple of
        ``mini_batch_size`` (at least one mini-batch: ``span_length``); 0: the whole sequence
        at once; None (the default): ``DEFAULT_SPANS``, 1024 for TTT-Linear and 2048 for
        TTT-MLP (with the CPU kernel, TTT-MLP's forward at L=8192 ran 1.29x faster in spans
        of 2048 than whole, its fwd+bwd the same; benchmarks/README.md).
      initializer_range: std of the normal initialiser of projections and inner weights.
    """

    model_dim: int
    num_heads: int
    mini_batch_size: int = 16
    ttt_layer_type: TTTLayerType = "linear"
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = "interleaved"
    rope_bounded: bool = True
    qk_l2_norm: bool = False
    ttt_base_lr: float = 1.0
    share_qk: bool = False
    conv_kernel: int = 4
    use_gate: bool = False
    scan_checkpoint_group: Optional[int] = None
    seq_chunk: Optional[int] = None
    initializer_range: float = 0.02

    def __post_init__(self):
        s = "ttt"
        for name in ("model_dim", "num_heads", "mini_batch_size", "conv_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(s, name, value, "a positive integer")
        if self.model_dim % self.num_heads:
            _fail(s, "num_heads", self.num_heads, f"a divisor of model_dim={self.model_dim}")
        _check_bools(s, self, ("use_rope", "rope_bounded", "qk_l2_norm", "share_qk", "use_gate"))
        _check_choice(s, "ttt_layer_type", self.ttt_layer_type, get_args(TTTLayerType))
        _check_choice(s, "rope_layout", self.rope_layout, get_args(RopeLayout))
        _check_positive(s, "rope_theta", self.rope_theta)
        _check_positive(s, "ttt_base_lr", self.ttt_base_lr)
        _check_positive(s, "initializer_range", self.initializer_range)
        if self.use_rope and self.head_dim % 2:
            _fail(s, "num_heads", self.num_heads,
                  f"a value giving an even head_dim when use_rope=true (head_dim={self.head_dim})")
        g = self.scan_checkpoint_group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 0):
            _fail(s, "scan_checkpoint_group", g,
                  "an integer >= 0 (0: keep every state) or null (chosen for least memory)")
        if self.seq_chunk is not None:
            _check_int(s, "seq_chunk", self.seq_chunk, minimum=0)

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def span_length(self) -> int:
        """``seq_chunk`` (or its default) in whole mini-batches (at least one); 0: no spans."""
        chunk = self.seq_chunk
        if chunk is None:
            chunk = DEFAULT_SPANS[self.ttt_layer_type]
        if not chunk:
            return 0
        b = self.mini_batch_size
        return max(b, chunk // b * b)

    @property
    def inner_widths(self) -> tuple[int, ...]:
        """Widths of the inner model's layers, input first: ``(f, f)`` or ``(f, 4f, f)``."""
        f = self.head_dim
        return (f, f) if self.ttt_layer_type == "linear" else (f, MLP_EXPANSION * f, f)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The TTT-LM (docs/architecture.md §2): embed -> blocks -> RMSNorm -> lm_head.

    Attributes:
      vocab_size: number of token ids.
      num_layers: number of blocks.
      intermediate_size: hidden width of the SwiGLU feed-forward.
      ttt: the TTT layer of every block; ``ttt.model_dim`` is the model width.
      pre_conv: add ``x += Conv(RMSNorm(x))`` before the TTT sub-block.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      rms_norm_eps: epsilon of every RMSNorm.
      dtype: compute dtype of embeddings and projections (params stay float32; the inner TTT
        math always runs in float32).
      seq_modeling: the sequence layer of every block: ``ttt`` (the TTT layer) or ``swa``
        (a causal sliding-window attention baseline with RoPE over absolute positions; it reuses
        ``ttt.model_dim``, ``ttt.num_heads``, ``ttt.rope_theta`` and ``ttt.rope_layout``).
      attention_window: with ``seq_modeling: swa``, each token attends to itself and the
        ``attention_window - 1`` tokens before it.
      loss_chunk: the training loss runs the LM head and the cross-entropy together, this
        many tokens at a time (``ttt_jax.math.cross_entropy``): the ``[tokens, vocab]`` logits
        are never whole, which at vocab 32000 and 4096 tokens per micro-batch measured 0.34x
        the memory of the head and loss and 1.19x their speed on the CPU
        (benchmarks/README.md). 0: materialise the logits (``__call__``) and take the loss
        of those.
    """

    vocab_size: int
    num_layers: int
    intermediate_size: int
    ttt: TTTConfig
    pre_conv: bool = False
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    dtype: DType = "float32"
    seq_modeling: SeqModeling = "ttt"
    attention_window: int = 128
    loss_chunk: int = 1024

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "intermediate_size", "attention_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail("model", name, value, "a positive integer")
        _check_bools("model", self, ("pre_conv", "tie_word_embeddings"))
        _check_int("model", "loss_chunk", self.loss_chunk, minimum=0)
        if not isinstance(self.ttt, TTTConfig):
            _fail("model", "ttt", self.ttt, "a TTTConfig")
        _check_positive("model", "rms_norm_eps", self.rms_norm_eps)
        _check_choice("model", "dtype", self.dtype, get_args(DType))
        _check_choice("model", "seq_modeling", self.seq_modeling, get_args(SeqModeling))
        if self.seq_modeling == "swa" and self.ttt.head_dim % 2:
            _fail("model", "seq_modeling", self.seq_modeling,
                  f"'ttt' when ttt.head_dim={self.ttt.head_dim} is odd (attention uses RoPE)")

    @property
    def model_dim(self) -> int:
        return self.ttt.model_dim
