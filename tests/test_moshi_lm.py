"""MoshiLM against the real ``moshi`` package's ``LMModel`` (moshi==0.2.13, torch CPU), and the
Moshi fine-tuning loss against a direct numpy computation.

Small ``LMModel`` s with random weights (norm alphas and layer scales moved off their constant
inits) are imported into ours; on codes that include the zero token ``-1``, our text and audio
logits must match moshi's forward within 1e-4 (float32), NaN where moshi's are, and the masks
must be equal. The same holds after a no-op TTT graft. Exports load back into moshi strictly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lm_module = pytest.importorskip("moshi.models.lm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ttt_jax.moshi.config import TTTArgs  # noqa: E402
from ttt_jax.moshi.lm import MoshiLM  # noqa: E402
from ttt_jax.moshi.lm_config import from_moshi_lm_kwargs, moshi_lm_kwargs  # noqa: E402
from ttt_jax.moshi.lm_convert import (from_lm_state_dict, load_lm, save_lm,  # noqa: E402
                                      to_lm_state_dicts)
from ttt_jax.moshi.lm_loss import loss_with_mask, moshi_lm_loss  # noqa: E402
from ttt_jax.tree import flatten, path_str  # noqa: E402

ATOL = 1e-4
BATCH, LENGTH = 2, 10
COMMON = dict(card=11, text_card=13, dim=32, num_heads=4, num_layers=2, hidden_scale=4,
              context=6, causal=True, gating="silu", positional_embedding="rope",
              max_period=10000, depformer_dim=16, depformer_num_heads=2)
# Three LMModel configurations: every depformer option moshi has, each in some case.
CASES = {
    # The published layout: one depformer_in and one weight set per codebook.
    "multi_linear+weights_per_step": dict(
        COMMON, delays=[0, 0, 1, 1], n_q=3, dep_q=3, norm="rms_norm_f32", layer_scale=None,
        depformer_num_layers=2, depformer_multi_linear=True, depformer_weights_per_step=True,
        depformer_pos_emb="sin", depformer_dim_feedforward=48),
    # One shared depformer_in and weight set; fewer predicted codebooks than inputs.
    "shared+layer_scale": dict(
        COMMON, delays=[0, 1, 0, 2], n_q=3, dep_q=2, norm="rms_norm", layer_scale=0.1,
        depformer_num_layers=1, depformer_multi_linear=False, depformer_weights_per_step=False,
        depformer_pos_emb="none", bias_proj=True, text_card_out=9),
    # A schedule sharing weight sets (and depformer_in) between steps and skipping set 1 (which
    # moshi still creates), per-set FFN widths.
    "schedule": dict(
        COMMON, delays=[1, 0, 1, 1], n_q=3, dep_q=3, norm="rms_norm_f32", layer_scale=None,
        depformer_num_layers=2, depformer_multi_linear=True, depformer_weights_per_step=True,
        depformer_weights_per_step_schedule=[0, 2, 2], depformer_dim_feedforward=[40, 48, 56],
        depformer_pos_emb="rope"),
}


def make_codes(kw, seed=0):
    """Random codes ``[B, K, T]`` with a few zero tokens (-1) in text and audio."""
    rng = np.random.default_rng(seed)
    text = rng.integers(0, kw.get("text_card_out") or kw["text_card"], (BATCH, 1, LENGTH))
    audio = rng.integers(0, kw["card"], (BATCH, kw["n_q"], LENGTH))
    codes = np.concatenate([text, audio], axis=1).astype(np.int64)
    codes[0, 0, 4] = -1
    codes[1, 1, 2] = -1
    codes[0, 2, 7] = -1
    return codes


def build_ref(kw, seed=0):
    torch.manual_seed(seed)
    ref = lm_module.LMModel(**kw).eval()
    with torch.no_grad():  # move norms and layer scales away from their constant inits
        for name, p in ref.named_parameters():
            if name.endswith("alpha") or name.endswith("scale"):
                p.add_(0.3 * torch.randn_like(p))
    return ref


def moshi_out(ref, codes):
    with torch.no_grad():
        out = ref(torch.from_numpy(codes))
    return {k: getattr(out, k).numpy() for k in ("logits", "mask", "text_logits", "text_mask")}


def random_target(cfg, codes, seed=0):
    """Random params of ``cfg`` (shapes from eval_shape), zero ``o_proj`` (a no-op graft)."""
    shapes = jax.eval_shape(MoshiLM(cfg).init, jax.random.PRNGKey(0), jnp.asarray(codes))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          shapes["params"])
    return jax.tree_util.tree_map_with_path(
        lambda p, v: np.zeros_like(v) if path_str(p).endswith("o_proj/kernel") else v, params)


class Case:
    """One configuration: moshi's model, our config, model and a jitted forward."""

    def __init__(self, name):
        self.kw = CASES[name]
        self.ref = build_ref(self.kw)
        self.cfg = from_moshi_lm_kwargs(self.kw)
        self.model = MoshiLM(self.cfg)
        self.codes = make_codes(self.kw)
        self.apply = jax.jit(self.model.apply)
        self.want = moshi_out(self.ref, self.codes)
        params, kept = from_lm_state_dict(self.cfg, self.ref.state_dict(),
                                          random_target(self.cfg, self.codes))
        assert kept == []
        self.params = params

    def ours(self, params, cfg=None):
        apply = self.apply if cfg is None else jax.jit(MoshiLM(cfg).apply)
        out = apply({"params": params}, jnp.asarray(self.codes))
        return {k: np.asarray(getattr(out, k)) for k in ("logits", "mask", "text_logits",
                                                         "text_mask")}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return Case(request.param)


def assert_matches(got, want):
    for key in ("mask", "text_mask"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for key in ("logits", "text_logits"):
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(np.isnan(got[key]), np.isnan(want[key]), err_msg=key)
        assert np.nanmax(np.abs(got[key] - want[key])) <= ATOL, key


def test_forward_matches_moshi(case):
    want = case.want
    assert_matches(case.ours(case.params), want)
    # The comparison can fail: the masks are not trivial, and the zero token matters.
    assert not want["mask"].all() and not want["text_mask"].all()
    codes = case.codes.copy()
    codes[codes == -1] = 0
    with torch.no_grad():
        other = case.ref(torch.from_numpy(codes)).text_logits.numpy()
    assert np.nanmax(np.abs(other - want["text_logits"])) > 1e-3


@pytest.mark.parametrize("case", ["multi_linear+weights_per_step"], indirect=True)
def test_noop_graft_keeps_moshi_logits(case):
    """TTT grafted (noop_init) into temporal layer 1 of moshi's weights: the same logits; a
    non-zero o_proj changes them. (The graft is in the temporal transformer, the same in every
    depformer layout: the published one suffices.)"""
    cfg = dataclasses.replace(case.cfg, ttt=TTTArgs(enable=True, layers="1", mini_batch_size=4,
                                                    use_rope=True, noop_init=True,
                                                    layer_type="linear"))
    target = random_target(cfg, case.codes, seed=1)
    params, kept = from_lm_state_dict(cfg, case.ref.state_dict(), target, require_ttt=False)
    assert kept and all("seq_modeling_block" in k for k in kept)
    apply = jax.jit(MoshiLM(cfg).apply)

    def run(p):
        out = apply({"params": p}, jnp.asarray(case.codes))
        return {k: np.asarray(getattr(out, k)) for k in case.want}

    assert_matches(run(params), case.want)
    flat = flatten(params)
    o_proj = [k for k in flat if k.endswith("o_proj/kernel")]
    assert len(o_proj) == 1
    moved = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.5 if path_str(p).endswith("o_proj/kernel") else v, params)
    got = run(moved)
    assert np.nanmax(np.abs(got["text_logits"] - case.want["text_logits"])) > 1e-3
    # Export: the moshi keys alone load strictly and give moshi's logits; TTT keys apart.
    moshi_sd, ttt_sd = to_lm_state_dicts(cfg, params)
    assert set(moshi_sd) == set(case.ref.state_dict())
    assert ttt_sd and all(k.startswith("transformer.layers.1.seq_modeling_block.")
                          for k in ttt_sd)
    assert "transformer.layers.1.seq_modeling_block.ttt_layer.ttt.wo.weight" in ttt_sd
    # and the pair imports back (strict, TTT included).
    back, kept = from_lm_state_dict(cfg, moshi_sd, target, ttt_state=ttt_sd)
    assert kept == []
    for k, v in flatten(back).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat[k]), err_msg=k)


def test_export_loads_into_moshi_strictly(case, tmp_path):
    moshi_sd, ttt_sd = to_lm_state_dicts(case.cfg, case.params)
    assert ttt_sd == {}
    fresh = lm_module.LMModel(**moshi_lm_kwargs(case.cfg)).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in moshi_sd.items()}, strict=True)
    assert_matches(moshi_out(fresh, case.codes), case.want)
    for k, v in case.ref.state_dict().items():
        np.testing.assert_array_equal(moshi_sd[k], v.numpy(), err_msg=k)
    # Through files and back: the exact config and params.
    save_lm(case.cfg, case.params, tmp_path / "out")
    cfg, params = load_lm(tmp_path / "out")
    assert cfg == case.cfg
    a, b = flatten(case.params), flatten(params)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    with pytest.raises(FileExistsError, match="force"):
        save_lm(case.cfg, case.params, tmp_path / "out")


@pytest.mark.parametrize("case", ["multi_linear+weights_per_step"], indirect=True)
def test_strict_import_names_every_problem(case):
    sd = {k: v.numpy() for k, v in case.ref.state_dict().items()}
    target = case.params
    missing = "depformer.layers.1.gating.2.linear_in.weight"
    with pytest.raises(ValueError, match=f"lacks 1 keys.*{missing}"):
        from_lm_state_dict(case.cfg, {k: v for k, v in sd.items() if k != missing}, target)
    extra = "depformer.layers.7.norm1.alpha"
    with pytest.raises(ValueError, match=f"no parameter reads.*{extra}"):
        from_lm_state_dict(case.cfg, {**sd, extra: sd["out_norm.alpha"]}, target)
    wrong = "linears.1.weight"
    with pytest.raises(ValueError, match=rf"{wrong} has shape \(12, 16\), expected \(11, 16\)"):
        from_lm_state_dict(case.cfg, {**sd, wrong: np.zeros((12, 16), np.float32)}, target)
    # All three at once: one error names each.
    bad = {k: v for k, v in sd.items() if k != missing}
    bad.update({extra: sd["out_norm.alpha"], wrong: np.zeros((12, 16), np.float32)})
    with pytest.raises(ValueError) as err:
        from_lm_state_dict(case.cfg, bad, target)
    assert all(k in str(err.value) for k in (missing, extra, wrong))
    # A TTT graft needs its keys unless asked to keep them at init.
    grafted = dataclasses.replace(case.cfg, ttt=TTTArgs(enable=True, layers="0",
                                                        mini_batch_size=4, layer_type="linear"))
    with pytest.raises(ValueError, match="transformer.layers.0.seq_modeling_block.ttt_layer"):
        from_lm_state_dict(grafted, sd, random_target(grafted, case.codes))


@pytest.mark.parametrize("case", ["multi_linear+weights_per_step"], indirect=True)
def test_legacy_stacked_attention_keys(case):
    """Older checkpoints stack a layer's weight sets under ``self_attn.in_proj_weight``; moshi's
    load hook splits them, and so do we: both give the same weights."""
    sd = {k: v.numpy() for k, v in case.ref.state_dict().items()}
    legacy = dict(sd)
    for prefix, sets in (("transformer.layers.0.", 1), ("depformer.layers.1.", 3)):
        for ours, theirs in (("in_projs", "in_proj_weight"), ("out_projs", "out_proj.weight")):
            keys = [f"{prefix}self_attn.{ours}.{j}.weight" for j in range(sets)]
            legacy[f"{prefix}self_attn.{theirs}"] = np.concatenate([legacy.pop(k) for k in keys])
    fresh = lm_module.LMModel(**case.kw)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in legacy.items()}, strict=True)
    params, _ = from_lm_state_dict(case.cfg, legacy, case.params)
    moshi_sd, _ = to_lm_state_dicts(case.cfg, params)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(moshi_sd[k], v.numpy(), err_msg=k)


def test_published_layout_matches_moshi_keys_and_shapes():
    """moshi's published 7B configuration (built on the meta device, nothing allocated): our
    config from its keyword arguments has exactly its state-dict keys and shapes."""
    from moshi.models import loaders

    from ttt_jax.moshi.lm_convert import lm_rules

    kw = dict(loaders._lm_kwargs)
    ref = lm_module.LMModel(**kw, device="meta")
    cfg = from_moshi_lm_kwargs(kw)
    assert cfg.depformer.weights_per_step and cfg.depformer_weight_sets == 8
    codes = jnp.zeros((1, cfg.num_codebooks, 2), jnp.int32)
    shapes = flatten(jax.eval_shape(MoshiLM(cfg).init, jax.random.PRNGKey(0), codes)["params"])
    from ttt_jax.moshi.convert import LAYOUTS
    ours = {}
    for r in lm_rules(cfg):
        ours[r.torch] = LAYOUTS[r.layout][0](np.zeros(shapes["/".join(r.flax)].shape)).shape
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs


def test_7b_preset_is_the_published_model():
    """``configs/moshi_lm_7b.yaml`` describes moshi's published LMModel (its keyword arguments in
    ``moshi.models.loaders``), plus the graft and the loss weights."""
    from pathlib import Path

    from moshi.models import loaders

    from ttt_jax.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "moshi_lm_7b.yaml").model
    want = from_moshi_lm_kwargs(loaders._lm_kwargs, ttt=cfg.ttt, dtype=cfg.dtype,
                                text_padding_weight=0.5, first_codebook_weight_multiplier=100.0,
                                remat=cfg.remat)
    assert cfg == want
    assert cfg.temporal.ttt_layers == ()  # as published; moshi_ttt_7b.yaml grafts TTT
    # What MoshiLM does not implement is refused by its LMModel key.
    for key, value in (("depformer_norm", "rms_norm"), ("norm_emb", True),
                       ("positional_scale", 0.5), ("depformer_low_rank_embeddings", 64),
                       ("demux_second_text_stream", True)):
        with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
            from_moshi_lm_kwargs({**loaders._lm_kwargs, key: value})
    with pytest.raises(ValueError, match=r"not understood by MoshiLM: \['bogus'\]"):
        from_moshi_lm_kwargs({**loaders._lm_kwargs, "bogus": 1})
    with pytest.raises(ValueError, match="transformer.norm='layer_norm' is invalid"):
        from_moshi_lm_kwargs({**loaders._lm_kwargs, "norm": "layer_norm"})


def test_bfloat16_objective_traces():
    """The compute dtype of the 7B preset (bfloat16) traces through the objective and its
    gradient (``eval_shape``: nothing compiled); logits stay float32."""
    from pathlib import Path

    from ttt_jax import registry
    from ttt_jax.config import apply_overrides, load_config

    run_cfg = apply_overrides(load_config(Path(__file__).resolve().parents[1] / "configs" /
                                          "moshi_lm_tiny.yaml"), ["model.dtype=bfloat16"])
    arch = registry.of(run_cfg)
    model = arch.build_model(run_cfg.model)
    params = arch.param_shapes(run_cfg.model)
    frames = arch.sample_input(run_cfg.model, 2, 9)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, frames), params)
    assert out.logits.dtype == out.text_logits.dtype == jnp.float32
    assert out.logits.shape == (2, 8, 9, 16) and out.text_logits.shape == (2, 1, 9, 32)
    grads = jax.eval_shape(jax.grad(lambda p: model.apply({"params": p}, frames, None,
                                                          method="loss_sums")[0]), params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


# ---- the fine-tuning loss ---------------------------------------------------------------


def np_loss(logits, target, mask, weights_fn):
    """The weighted masked mean cross-entropy, written with plain numpy loops."""
    total, norm = 0.0, 0.0
    b, k, t, _ = logits.shape
    for i in range(b):
        for j in range(k):
            for s in range(t):
                if not mask[i, j, s]:
                    continue
                w = weights_fn(j, target[i, j, s])
                row = logits[i, j, s].astype(np.float64)
                ce = np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[target[i, j, s]]
                total += w * ce
                norm += w
    return total / norm


def test_loss_matches_numpy():
    rng = np.random.default_rng(3)
    b, k, t, v = 2, 3, 5, 7
    logits = rng.standard_normal((b, k, t, v)).astype(np.float32) * 2
    target = rng.integers(0, v, (b, k, t))
    target[0, 0, :3] = 3  # padding ids in the text stream
    target[1, 0, 1] = 0
    mask = rng.random((b, k, t)) > 0.25
    logits[~mask] = np.nan  # invalid positions carry NaN logits, as moshi's
    audio = loss_with_mask(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(mask),
                           mode="audio", first_codebook_weight_multiplier=100.0)
    want = np_loss(logits, target, mask, lambda j, tok: 100.0 if j == 0 else 1.0)
    assert abs(float(audio) - want) <= 1e-5 * max(1.0, abs(want))
    text = loss_with_mask(jnp.asarray(logits[:, :1]), jnp.asarray(target[:, :1]),
                          jnp.asarray(mask[:, :1]), mode="text", text_padding_weight=0.5,
                          text_padding_ids=(3, 0, 3))
    want = np_loss(logits[:, :1], target[:, :1], mask[:, :1],
                   lambda j, tok: 0.5 if tok in (3, 0) else 1.0)
    assert abs(float(text) - want) <= 1e-5 * max(1.0, abs(want))
    # Masked targets may be the zero token -1 (as in real codes); gradients stay finite
    # although the masked logits are NaN.
    zeroed = np.where(mask, target, -1)
    again = loss_with_mask(jnp.asarray(logits), jnp.asarray(zeroed), jnp.asarray(mask),
                           mode="audio", first_codebook_weight_multiplier=100.0)
    assert float(again) == float(audio)
    grad = jax.grad(lambda x: loss_with_mask(x, jnp.asarray(zeroed), jnp.asarray(mask),
                                             mode="audio"))(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~mask] == 0)


@pytest.mark.parametrize("case", ["shared+layer_scale"], indirect=True)
def test_loss_on_moshi_output(case):
    """Our loss of our forward = the numpy loss of moshi's forward (text + audio)."""
    out = case.apply({"params": case.params}, jnp.asarray(case.codes))
    total, parts = moshi_lm_loss(case.cfg, out, jnp.asarray(case.codes), text_padding_weight=0.5,
                                 first_codebook_weight_multiplier=3.0)
    w = case.want
    codes = np.where(case.codes < 0, 0, case.codes)
    text = np_loss(w["text_logits"], codes[:, :1], w["text_mask"],
                   lambda j, tok: 0.5 if tok in (3, 0) else 1.0)
    audio = np_loss(w["logits"], codes[:, 1:3], w["mask"], lambda j, tok: 3.0 if j == 0 else 1.0)
    np.testing.assert_allclose(float(parts["text"]), text, rtol=1e-5)
    np.testing.assert_allclose(float(parts["audio"]), audio, rtol=1e-5)
    np.testing.assert_allclose(float(total), text + audio, rtol=1e-5)


# ---- the moshi_lm architecture: train -> export -> load in moshi --------------------------


PRESET = "moshi_lm_tiny.yaml"  # text + 8 codebooks, depformer, TTT-Linear in layer 0 (no-op)


def test_import_scores_like_moshi_and_exports_back(tmp_path):
    """A moshi ``LMModel`` file -> ``ttt-jax import`` (the preset's no-op graft): the training
    objective of the imported run on a validation batch is the Moshi loss of moshi's own
    forward (numpy); ``ttt-jax export`` of that run gives back moshi's file exactly."""
    from pathlib import Path

    from ttt_jax import registry
    from ttt_jax.checkpoint import load_run
    from ttt_jax.cli import main
    from ttt_jax.config import load_config
    from ttt_jax.moshi.convert import load_safetensors, save_safetensors
    from ttt_jax.moshi.data import make_frames_dataset

    preset = Path(__file__).resolve().parents[1] / "configs" / PRESET
    run_cfg = load_config(preset)
    cfg = run_cfg.model
    base = build_ref(moshi_lm_kwargs(cfg), seed=1)
    weights = {k: v.numpy() for k, v in base.state_dict().items()}
    save_safetensors(weights, tmp_path / "moshi.safetensors")
    assert main(["import", "--in", str(tmp_path / "moshi.safetensors"), "--config", str(preset),
                 "--out", str(tmp_path / "base")]) == 0
    saved = load_run(tmp_path / "base")
    assert saved.config == run_cfg and saved.step == 0

    ds = make_frames_dataset(run_cfg.data, vocab_sizes=(cfg.text_card,) + (cfg.card,) * cfg.n_q,
                             seed=run_cfg.train.seed, split="val")
    frames = ds.batch(0)  # [B, T, K], what the trainer feeds the objective
    model = registry.of(run_cfg).build_model(cfg)
    loss, count = jax.jit(lambda p, x: model.apply({"params": p}, x, None, method="loss_sums"))(
        saved.params, jnp.asarray(frames))
    codes = np.swapaxes(frames, 1, 2).astype(np.int64)
    ref = moshi_out(base, codes)
    want = (np_loss(ref["text_logits"], codes[:, :1], ref["text_mask"],
                    lambda j, tok: cfg.text_padding_weight if tok in (3, 0) else 1.0)
            + np_loss(ref["logits"], codes[:, 1:], ref["mask"],
                      lambda j, tok: cfg.first_codebook_weight_multiplier if j == 0 else 1.0))
    assert float(count) == 1.0 and abs(float(loss) - want) <= 1e-4, (float(loss), want)

    assert main(["export", "--checkpoint", str(tmp_path / "base"), "--out",
                 str(tmp_path / "out")]) == 0
    back = load_safetensors(tmp_path / "out" / "model.safetensors")
    assert set(back) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    ttt = load_safetensors(tmp_path / "out" / "ttt.safetensors")
    assert not np.any(ttt["transformer.layers.0.seq_modeling_block.ttt_layer.ttt.wo.weight"])


def test_tiny_preset_trains_then_moshi_loads_the_export(tmp_path, train_main):
    """``train.py --config configs/moshi_lm_tiny.yaml`` lowers the validation loss of the Moshi
    objective; ``ttt-jax export`` is the checkpoint exactly, moshi loads its ``model.safetensors``
    with ``strict=True`` and gives our logits with the graft switched off (o_proj = 0)."""
    import json
    from pathlib import Path

    from ttt_jax.checkpoint import load_run
    from ttt_jax.cli import main
    from ttt_jax.config import load_config
    from ttt_jax.moshi.convert import load_safetensors
    from ttt_jax.moshi.lm_config import MoshiLMRunConfig

    preset = Path(__file__).resolve().parents[1] / "configs" / PRESET
    run_dir = tmp_path / "run"
    assert train_main(["--config", str(preset),
                       "--set", "train.steps=24", "--set", "train.eval_every=24",
                       "--set", "train.log_every=12", "--set", "train.eval_batches=1",
                       "--set", "optim.warmup_steps=4", "--set", "checkpoint.every=24",
                       "--set", f"train.run_dir={run_dir}"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(val) == 2 and val[-1] < val[0] - 0.5, val  # 6.25 -> 5.43 nats here
    assert isinstance(load_config(run_dir / "config.yaml"), MoshiLMRunConfig)

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    ref = lm_module.LMModel(**meta["lm_kwargs"]).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in
                         load_safetensors(out / "model.safetensors").items()}, strict=True)
    ttt = load_safetensors(out / "ttt.safetensors")
    assert ttt and all(k.startswith("transformer.layers.0.seq_modeling_block.") for k in ttt)
    cfg, params = load_lm(out)
    saved = flatten(load_run(run_dir).params)  # the export is the checkpoint, exactly
    assert cfg == load_config(preset).model
    assert set(saved) == set(flatten(params))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(saved[k]), err_msg=k)
    assert np.any(flatten(params)["transformer/layers_0/seq_modeling_block/ttt_layer/o_proj/"
                                  "kernel"])  # training moved the graft off its no-op start
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.zeros_like(v) if path_str(p).endswith("o_proj/kernel") else v, params)
    codes = make_codes({"text_card": cfg.text_card, "card": cfg.card, "n_q": cfg.n_q})
    out_ours = jax.jit(MoshiLM(cfg).apply)({"params": params}, jnp.asarray(codes))
    got = {k: np.asarray(getattr(out_ours, k)) for k in ("logits", "mask", "text_logits",
                                                         "text_mask")}
    assert_matches(got, moshi_out(ref, codes))


def test_preset_round_trips_and_lacking_features_are_refused():
    from pathlib import Path

    from ttt_jax import registry
    from ttt_jax.config import from_dict, load_config, to_dict
    from ttt_jax.moshi.lm_config import MoshiLMRunConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "moshi_lm_tiny.yaml"
    cfg = load_config(path)
    assert type(cfg) is MoshiLMRunConfig and cfg.model.n_q == 8 and cfg.model.dep_q == 8
    assert from_dict(MoshiLMRunConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="architecture 'moshi_lm' does not support diagnostics"):
        registry.load_run(path, ["train.diagnostics_every=1"])
    assert registry.load_run(path, ["mesh.data=1"]).mesh.data == 1  # tests/test_moshi_sharding.py
    with pytest.raises(ValueError, match=r"model.delays=\(0, 0\) is invalid: expected n_q \+ 1 "
                                         r"= 9 integers"):
        registry.load_run(path, ["model.delays=[0, 0]"])
