"""Mutation check: do the tests catch deliberate breakages of the core?

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py --list     # names only
    python tests/mutation_check.py --only no_tril,resume_skipped
    python tests/mutation_check.py --tests-from REV   # the same mutations against older tests

Each mutation replaces source text in a temporary copy of the working tree (tracked and
untracked, not ignored files), then runs a targeted pytest selection there; the mutation is
*caught* when a test fails (exit status 1), *missed* when the selection passes. A mutation
whose source text is no longer there is reported *stale* (update it with the code). The copy
imports its own ``ttt_jax`` (``PYTHONPATH``), writes no bytecode, and the checkout is never
touched. Not collected by pytest (the file name does not start with ``test_``); not part of
``make test``: it runs every selection once per mutation (minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # relative to the repository root
    edits: tuple  # ((old, new), ...): each old occurs exactly once; "re:" old is a regex
    tests: tuple  # pytest arguments run in the copy


CORRECTNESS = ("tests/test_ttt_correctness.py",)
KERNEL = "tests/test_cpu_kernel.py"
# The per-token step weights eta = tril(tok lr^T) of the forward step's masks
# M_i = eta * (xbar_i a_i^T + 1) (``dual_outputs``; the derivative has its own copy).
DUAL_MASK = r"re:eta = jnp\.tril\((tok\[:, None\] \* lr\[\.\.\., None, :\])\)(  # \[B, H, b, b\]\n    xbar = xq)"

MUTATIONS = [
    # --- the core -----------------------------------------------------------------------------
    Mutation("no_tril", "dual form: the mask of whole mini-batches without its tril",
             "ttt_jax/math/ttt_step.py",
             ((DUAL_MASK, r"eta = \1\2"),),
             CORRECTNESS),
    Mutation("end_state_for_every_token",
             "dual form: every token reads the mini-batch's end state (tok[b-1], all j)",
             "ttt_jax/math/ttt_step.py",
             ((DUAL_MASK, r"eta = tok[-1] * lr[..., None, :]\2"),),
             CORRECTNESS),
    Mutation("resume_skipped", "trainer: checkpoint.resume ignored (always starts afresh)",
             "ttt_jax/trainer.py",
             (("restored = ckpt.restore_latest(state, log=print_fn) if c.resume else None",
               "restored = None"),),
             ("tests/test_checkpoint.py::test_resume_after_sigkill_is_bit_identical",)),
    Mutation("rope_rotates_v", "layer: V rotated as well as Q and K",
             "ttt_jax/nn/ttt_layer.py",
             (("            xq, xk = apply_bounded_rope(xq, xk, pos,",
               "            xv, _ = apply_bounded_rope(xv, xv, pos, mini_batch_size=cfg."
               "mini_batch_size, theta=cfg.rope_theta, layout=cfg.rope_layout, "
               "bounded=cfg.rope_bounded)\n"
               "            xq, xk = apply_bounded_rope(xq, xk, pos,"),),
             CORRECTNESS),
    Mutation("span_starts_fresh", "layer: each span of a long sequence starts from the params",
             "ttt_jax/nn/ttt_layer.py",
             (("mdl._span(xc, SequenceMetadata(position_ids=pc), state, tail)",
               "mdl._span(xc, SequenceMetadata(position_ids=pc), None, tail)"),),
             CORRECTNESS),
    Mutation("deferred_update_dropped_at_group_end",
             "scan: a deferred update (TTT-Linear) is not applied after each group's last step",
             "ttt_jax/math/ttt_scan.py",
             (("    return _pending(states, deltas), z_bar", "    return states, z_bar"),),
             CORRECTNESS + ("tests/test_ttt_vjp.py", KERNEL)),
    Mutation("deferred_update_skipped_in_recomputation",
             "scan: the backward's recomputation never applies the deferred update",
             "ttt_jax/math/ttt_scan.py",
             (("        states = _pending(states, deltas)  # the update the previous mini-batch",
               "        pass  # the update the previous mini-batch"),),
             ("tests/test_ttt_vjp.py", KERNEL)),
    Mutation("cpu_kernel_no_tril", "TTT-Linear's CPU kernel: the forward's mask without its tril",
             "ttt_jax/math/csrc/ttt_cpu.cc",
             (("KT.data(), b, M.data());  // Q K^T\n        for (int64_t i = 0; i < b; ++i)\n"
               "          for (int64_t j = 0; j < b; ++j)\n            M[i * b + j] = j <= i ?",
               "KT.data(), b, M.data());  // Q K^T\n        for (int64_t i = 0; i < b; ++i)\n"
               "          for (int64_t j = 0; j < b; ++j)\n            M[i * b + j] = true ?"),),
             (KERNEL,)),
    Mutation("cpu_kernel_dtok_from_masks_dropped",
             "CPU kernels: the derivative drops the masks' part of d tok",
             "ttt_jax/math/csrc/ttt_cpu.cc",
             (("      dtk[i] += deta * lr_row[j];\n      dl[j * H]", "      dl[j * H]"),),
             (KERNEL,)),
    Mutation("cpu_kernel_recompute_skips_update",
             "TTT-Linear's CPU kernel: the derivative recomputes a group's states without updates",
             "ttt_jax/math/csrc/ttt_cpu.cc",
             (("          if (t + 1 < t1)\n            update(W.data()",
               "          if (false)\n            update(W.data()"),),
             (KERNEL,)),
    Mutation("claims_skip_items",
             "native kernels: the takers claim every other item (half the chains or rows never "
             "run)",
             "ttt_jax/math/csrc/parallel.h",
             (("    body([&next] { return next.fetch_add(1, std::memory_order_relaxed); });",
               "    body([&next] { return next.fetch_add(2, std::memory_order_relaxed); });"),),
             (KERNEL, "tests/test_cross_entropy.py")),
    Mutation("mlp_kernel_gelu_second_derivative",
             "TTT-MLP's CPU kernel: gelu_tanh'' with the sign of its t u'^2 term flipped",
             "ttt_jax/math/csrc/ttt_cpu.cc",
             (("(du + 3.f * kGeluA * kGeluC * v * v - v * t * du * du);",
               "(du + 3.f * kGeluA * kGeluC * v * v + v * t * du * du);"),),
             (KERNEL,)),
    Mutation("dense_dot_tokens_misaligned",
             "linear layers' derivative: dW pairs each token's input with another's cotangent",
             "ttt_jax/math/dense.py",
             (("    x2 = x.reshape(-1, x.shape[-1])\n", "    x2 = x.reshape(-1, x.shape[-1])[::-1]\n"),),
             ("tests/test_dense.py",)),
    Mutation("fused_head_grad_unmasked", "the fused LM head's gradient ignores the token mask",
             "ttt_jax/math/cross_entropy.py",
             (("dlogits = jnp.exp(logits - lse[:, None]) * mc[:, None]",
               "dlogits = jnp.exp(logits - lse[:, None])"),),
             ("tests/test_cross_entropy.py",)),
    Mutation("native_softmax_unmasked",
             "the native softmax pass of the LM head ignores the token mask in the softmax term",
             "ttt_jax/math/csrc/xent_cpu.cc",
             (("  scale(x, n, weight / sum);", "  scale(x, n, 1.f / sum);"),),
             ("tests/test_cross_entropy.py",)),
    Mutation("rope_position_off_by_one", "bounded RoPE reads (p + 1) % b",
             "ttt_jax/math/rope.py",
             (("return jnp.mod(position_ids, mini_batch_size)",
               "return jnp.mod(position_ids + 1, mini_batch_size)"),),
             CORRECTNESS),
    # --- one per claim the tests pin -----------------------------------------------------------
    Mutation("unbounded_rope_wraps", "rope_bounded: false still wraps positions (at 4b)",
             "ttt_jax/math/rope.py",
             (("cos, sin = position_angles(position_ids, xq.shape[-1], theta)",
               "cos, sin = position_angles(position_ids % (4 * mini_batch_size), xq.shape[-1], "
               "theta)"),),
             CORRECTNESS),
    Mutation("base_lr_ignored", "layer: ttt_base_lr read as 1.0",
             "ttt_jax/nn/ttt_layer.py",
             (("lr = cfg.ttt_base_lr * jax.nn.sigmoid(logits)", "lr = 1.0 * jax.nn.sigmoid(logits)"),),
             CORRECTNESS),
    Mutation("inner_grad_detached",
             "no gradient flows through the inner-loss gradient G (the forward is unchanged)",
             "ttt_jax/math/ttt_step.py",
             (("dzs[-1], dtarget, dlnw, dlnb = ln_vjp(dgs[-1])",
               "dzs[-1], dtarget, dlnw, dlnb = ln_vjp(0.0 * dgs[-1])"),),
             ("tests/test_ttt_correctness.py", "tests/test_variants.py", "-k", "gradient")),
    Mutation("inner_math_in_compute_dtype", "layer: the inner loop runs in the compute dtype",
             "ttt_jax/nn/ttt_layer.py",
             (("        return x.astype(jnp.float32)\n",
               "        return x\n"),),
             ("tests/test_variants.py", "-k", "bfloat16")),
    Mutation("sampling_temperature_sqrt", "sampling divides the logits by sqrt(temperature)",
             "ttt_jax/decode.py",
             (("/ jnp.where(temperature > 0, temperature, 1.0)",
               "/ jnp.where(temperature > 0, jnp.sqrt(temperature), 1.0)"),),
             ("tests/test_decode.py", "-k", "sampl or top_k")),
    Mutation("keep_one_more", "checkpoints: keep + 1 steps kept",
             "ttt_jax/checkpoint/manager.py",
             (("max_to_keep=keep,", "max_to_keep=keep + 1,"),),
             ("tests/test_checkpoint.py::test_resume_after_sigkill_is_bit_identical",)),
    Mutation("dtype_not_checked", "restore compares shapes only (a dtype change is cast)",
             "ttt_jax/checkpoint/manager.py",
             (("for k in sorted(set(saved) & set(target)) if saved[k] != target[k]]",
               "for k in sorted(set(saved) & set(target)) if saved[k][0] != target[k][0]]"),),
             ("tests/test_checkpoint.py", "-k", "mismatch")),
    Mutation("fallback_keeps_target_params",
             "a fallback past a corrupt step restores its step but keeps the target's params",
             "ttt_jax/checkpoint/manager.py",
             (('            return from_stored_tree(target, restored["state"]), meta',
               '            return (from_stored_tree(target, restored["state"]).replace('
               'params=target.params) if corrupt else from_stored_tree(target, '
               'restored["state"])), meta'),),
             ("tests/test_checkpoint.py", "-k", "corrupted")),
    Mutation("init_from_ignored", "trainer: checkpoint.init_from loads nothing",
             "ttt_jax/trainer.py",
             (("return state.replace(params=params, opt_state=optimizer.init(params))",
               "return state"),),
             ("tests/test_checkpoint.py::test_init_from_and_strict_through_a_run",)),
    Mutation("schedule_decay_too_short", "schedule: the cosine ends warmup_steps early",
             "ttt_jax/training.py",
             (("decay_steps=max(total_steps, warmup + 1)", "decay_steps=max(total_steps - warmup, 1)"),),
             ("tests/test_training.py", "-k", "schedule")),
    Mutation("b2_decayed", "weight decay on the inner MLP's second bias",
             "ttt_jax/training.py",
             (('"ttt_norm_bias", "b1", "b2")', '"ttt_norm_bias", "b1")'),),
             ("tests/test_training.py", "-k", "decay")),
    Mutation("swiglu_gelu", "the block's MLP gates with gelu instead of silu",
             "ttt_jax/nn/layers.py",
             (("h = nn.silu(dense(", "h = nn.gelu(dense("),),
             ("tests/test_model.py", "-k", "logits_computed")),
    Mutation("preset_mlp_base_lr", "the ttt_mlp_125m preset with TTT-Linear's base lr (1.0)",
             "ttt_jax/configs/ttt_mlp_125m.yaml",
             (("ttt_base_lr: 0.1", "ttt_base_lr: 1.0"),),
             ("tests/test_model.py", "-k", "presets_exist")),
    Mutation("error_two_lines", "errors: a hint line after the error line",
             "ttt_jax/errors.py",
             ((r're:( *)print\(f"error: \{(e|message)\}", file=sys\.stderr\)',
               r'\1print(f"error: {\2}", file=sys.stderr)\n\1print("see --help", file=sys.stderr)'),),
             ("tests/test_errors.py",)),
    Mutation("recall_accuracy_inverted", "evals: recall accuracy counts the wrong answers",
             "ttt_jax/evals/tasks.py",
             (("acc = float(np.mean(pred[:, q] == values))", "acc = float(np.mean(pred[:, q] != values))"),),
             ("tests/test_evals.py", "-k", "cli_on_a_tiny")),
]


def copy_tree(dst: Path) -> None:
    """Tracked and untracked (not ignored) files of the working tree, symlinks kept."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():  # deleted in the working tree
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        elif src.is_file():
            shutil.copy2(src, out)


def pytest_env(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_selection(root: Path, tests: tuple, timeout: int) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=pytest_env(root), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    """The first failing test, without its parameters."""
    m = re.search(r"^(?:FAILED|ERROR) ([^\s\[]+)", output, re.M)
    return m.group(1) if m else ""


def count(text: str, old: str) -> int:
    return len(re.findall(old[3:], text)) if old.startswith("re:") else text.count(old)


def substitute(text: str, old: str, new: str) -> str:
    return re.sub(old[3:], new, text) if old.startswith("re:") else text.replace(old, new)


def first_error_line(output: str) -> str:
    """The first ``E   ...`` line of pytest's report: what the failing assertion said."""
    m = re.search(r"^E +(.+)$", output, re.M)
    return m.group(1).strip()[:200] if m else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true",
                        help="first run every selection unmutated (it must pass)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per selection")
    parser.add_argument("--tests-from", metavar="REV",
                        help="use the tests/ files of this git revision (what they caught then)")
    parser.add_argument("--why", action="store_true",
                        help="also print the first assertion message of each caught mutation")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:30s} {m.what}  [{' '.join(m.tests)}]")
        return 0

    with tempfile.TemporaryDirectory(prefix="ttt_jax_mutation_") as tmp:
        root = Path(tmp)
        copy_tree(root)
        if args.tests_from:
            names = subprocess.run(["git", "ls-tree", "-r", "--name-only", args.tests_from,
                                    "tests/"], cwd=REPO, check=True, capture_output=True,
                                   text=True).stdout.split()
            for rel in names:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(subprocess.run(
                    ["git", "show", f"{args.tests_from}:{rel}"], cwd=REPO, check=True,
                    capture_output=True).stdout)
        where = subprocess.run([sys.executable, "-c", "import ttt_jax; print(ttt_jax.__file__)"],
                               cwd=root, env=pytest_env(root), capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(root)):
            print(f"the copy does not import its own ttt_jax: {where.stdout}{where.stderr}")
            return 2
        if args.baseline:
            for tests in sorted({m.tests for m in chosen}):
                rc, out = run_selection(root, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: {'pass' if rc == 0 else 'FAIL'}", flush=True)
                if rc != 0:
                    print(out[-3000:])
                    return 2
        results = []
        for m in chosen:
            path = root / m.path
            original = path.read_text() if path.exists() else None
            stale = original is None or any(count(original, old) != 1 for old, _ in m.edits)
            start = time.time()
            if stale:
                verdict, detail = "stale", "source text not found"
            else:
                text = original
                for old, new in m.edits:
                    text = substitute(text, old, new)
                path.write_text(text)
                try:
                    rc, out = run_selection(root, m.tests, args.timeout)
                finally:
                    path.write_text(original)
                if rc == 1:
                    verdict, detail = "caught", first_failure(out)
                elif rc == 0:
                    verdict, detail = "MISSED", ""
                else:
                    verdict, detail = "error", f"pytest exit status {rc}: " + out[-300:].strip()
            results.append((m, verdict, detail, time.time() - start))
            print(f"{m.name:30s} {verdict:7s} {time.time() - start:6.0f}s  {detail}", flush=True)
            if args.why and verdict == "caught":
                print(f"{'':30s} {first_error_line(out)}", flush=True)
    print()
    print("| mutation | what it breaks | result | first failing test |")
    print("|---|---|---|---|")
    for m, verdict, detail, _ in results:
        print(f"| `{m.name}` | {m.what} | {verdict} | {detail and '`' + detail + '`'} |")
    caught = sum(v == "caught" for _, v, _, _ in results)
    print(f"\n{caught}/{len(results)} caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
