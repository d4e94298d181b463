"""A compact PyTorch (float32) TTT-LM forward that reads an export by the reference key names.

Written from docs/architecture.md §1-§2 only: no ttt_jax code, and not ttt-lm-pytorch's code. The inner
loop is the **primal** form with per-token gradients from ``torch.autograd`` (the library uses a
closed-form dual form), RoPE rotates interleaved pairs as complex numbers by ``position % b``
(ttt-lm-pytorch's behaviour; it never rotates in the half layout), convs use ``F.conv1d``.

Only ``use_rope`` is read from the ``ttt_jax`` block of ``config.json`` (ttt-lm-pytorch itself
always rotates), so an export with RoPE off can be checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# docs/architecture.md §1.5 / §1.8: eps of the per-head inner LayerNorm and of post_norm.
LN_EPS = 1e-6


def rms_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def layer_norm(x, weight, bias, eps=LN_EPS):
    """LayerNorm over the last axis, biased variance; weight/bias broadcast (per head or per d)."""
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def causal_conv(x, weight, bias):
    """Depthwise causal conv: x ``[B, L, C]``, weight ``[C, 1, K]`` (last tap = current token)."""
    length, channels, k = x.shape[1], x.shape[2], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=k - 1, groups=channels)
    return y[..., :length].transpose(1, 2)


def rope_interleaved(x, mini_batch_size, theta):
    """Rotates pairs ``(x[2k], x[2k+1])`` of ``x [B, H, L, f]`` by ``(t % b) * theta^(-2k/f)``."""
    f, length = x.shape[-1], x.shape[2]
    inv_freq = theta ** (-torch.arange(0, f, 2, dtype=torch.float64) / f)  # [f/2]
    pos = (torch.arange(length) % mini_batch_size).to(torch.float64)
    angles = pos[:, None] * inv_freq[None]  # [L, f/2]
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], f // 2, 2).contiguous())
    return torch.view_as_real(z * rot).reshape(x.shape)


def inner_apply(state, x):
    """The inner model before its LayerNorm; state: list of ``(W [B,H,i,o], b [B,H,1,o])``."""
    for i, (w, b) in enumerate(state):
        x = x @ w + b
        if i + 1 < len(state):
            x = F.gelu(x, approximate="tanh")
    return x


def token_grads(state, k, v, ln_w, ln_b):
    """Gradients of ``0.5 ||LN(f(k)) - (v - k)||^2`` at ``state`` for one token, by autograd.

    ``k, v: [B, H, f]``. Summing the loss over ``B, H`` keeps the gradients separate, since every
    ``(B, H)`` has its own copy of the weights.
    """
    leaves = [p.detach().requires_grad_(True) for layer in state for p in layer]
    with torch.enable_grad():
        pairs = list(zip(leaves[0::2], leaves[1::2]))
        pred = layer_norm(inner_apply(pairs, k[:, :, None]), ln_w, ln_b)
        loss = 0.5 * (pred - (v - k)[:, :, None]).pow(2).sum()
        grads = torch.autograd.grad(loss, leaves)
    return list(zip(grads[0::2], grads[1::2]))


def inner_loop(params, xq, xk, xv, lr, tok, ln_w, ln_b):
    """Primal TTT: token ``i`` of a mini-batch reads out with
    ``W_i = W0 - tok[i] * sum_{j<=i} lr[j] grad_j(W0)``; the next mini-batch starts at ``W_last``.
    A final partial mini-batch is just shorter."""
    bsz, _, length, _ = xq.shape
    mb = tok.shape[0]
    state = [tuple(p[None].expand(bsz, *p.shape).clone() for p in layer) for layer in params]
    out = torch.empty_like(xq)
    for start in range(0, length, mb):
        acc = [tuple(torch.zeros_like(p) for p in layer) for layer in state]
        current = state
        for i, t in enumerate(range(start, min(start + mb, length))):
            g = token_grads(state, xk[:, :, t], xv[:, :, t], ln_w, ln_b)
            eta = lr[:, :, t, None, None]  # [B, H, 1, 1]
            acc = [(aw + eta * gw, ab + eta * gb) for (aw, ab), (gw, gb) in zip(acc, g)]
            current = [(w - tok[i] * aw, b - tok[i] * ab) for (w, b), (aw, ab) in zip(state, acc)]
            z = inner_apply(current, xq[:, :, t, None])
            out[:, :, t] = xq[:, :, t] + layer_norm(z, ln_w, ln_b)[:, :, 0]
        state = current
    return out


class TorchTTTLM:
    """The TTT-LM of an export directory (``config.json`` + ``model.safetensors``), float32."""

    def __init__(self, export_dir):
        export_dir = Path(export_dir)
        self.cfg = json.loads((export_dir / "config.json").read_text())
        self.sd = {k: v.to(torch.float32) for k, v in
                   load_file(str(export_dir / "model.safetensors")).items()}
        block = self.cfg.get("ttt_jax", {}).get("model_config", {})
        self.use_rope = block.get("ttt", {}).get("use_rope", True)

    def _ttt(self, p, x, base_lr):
        c = self.cfg
        bsz, length, d = x.shape
        heads, mb = c["num_attention_heads"], c["mini_batch_size"]
        f = d // heads
        q = x @ p["q_proj.weight"].T
        if c["share_qk"]:
            k = causal_conv(q, p["conv_k.weight"], p["conv_k.bias"])
            q = causal_conv(q, p["conv_q.weight"], p["conv_q.bias"])
        else:
            k = x @ p["k_proj.weight"].T
        v = x @ p["v_proj.weight"].T
        xq, xk, xv = (t.reshape(bsz, length, heads, f).transpose(1, 2) for t in (q, k, v))
        if self.use_rope:
            xq = rope_interleaved(xq, mb, c["rope_theta"])
            xk = rope_interleaved(xk, mb, c["rope_theta"])
        gate = torch.einsum("bld,hod->bhl", x, p["learnable_ttt_lr_weight"])
        lr = base_lr * torch.sigmoid(gate + p["learnable_ttt_lr_bias"][None]) / f  # [B, H, L]
        tok = torch.clamp(1.0 / torch.arange(1, mb + 1) + p["learnable_token_idx"], min=0.0)
        n_layers = 1 if c["ttt_layer_type"] == "linear" else 2
        params = [(p[f"W{i + 1}"], p[f"b{i + 1}"]) for i in range(n_layers)]
        ln_w, ln_b = p["ttt_norm_weight"][:, None], p["ttt_norm_bias"][:, None]  # [H, 1, f]
        out = inner_loop(params, xq, xk, xv, lr, tok, ln_w, ln_b)
        out = layer_norm(out.transpose(1, 2).reshape(bsz, length, d), p["post_norm.weight"],
                         p["post_norm.bias"])
        if c["use_gate"]:
            out = F.gelu(x @ p["g_proj.weight"].T, approximate="tanh") * out
        return out @ p["o_proj.weight"].T

    @torch.no_grad()
    def logits(self, tokens, ttt_base_lr=None):
        """tokens ``[B, L]`` int -> logits ``[B, L, V]`` float32; ``ttt_base_lr`` overrides."""
        c, sd = self.cfg, self.sd
        eps = c["rms_norm_eps"]
        base_lr = c["ttt_base_lr"] if ttt_base_lr is None else ttt_base_lr
        x = sd["model.embed_tokens.weight"][torch.as_tensor(tokens, dtype=torch.long)]
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            p = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            if c["pre_conv"]:
                h = rms_norm(x, p["conv.norm.weight"], eps)
                x = x + causal_conv(h, p["conv.conv.weight"], p["conv.conv.bias"])
            sm = {k[len("seq_modeling_block."):]: v for k, v in p.items()
                  if k.startswith("seq_modeling_block.")}
            x = x + self._ttt(sm, rms_norm(x, p["seq_norm.weight"], eps), base_lr)
            h = rms_norm(x, p["ffn_norm.weight"], eps)
            x = x + (F.silu(h @ p["mlp.gate_proj.weight"].T) * (h @ p["mlp.up_proj.weight"].T)
                     ) @ p["mlp.down_proj.weight"].T
        x = rms_norm(x, sd["model.norm.weight"], eps)
        head = sd["model.embed_tokens.weight"] if c["tie_word_embeddings"] else sd["lm_head.weight"]
        return x @ head.T
