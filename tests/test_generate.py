"""``ttt-jax generate`` on a byte-level checkpoint trained here for a few seconds."""

import collections

import pytest

from ttt_jax import ModelConfig, RunConfig, TTTConfig
from ttt_jax.config import DataConfig, OptimConfig, TrainConfig
from ttt_jax.cli import main as cli
from ttt_jax.generate import ids_to_text, text_to_ids


def main(argv):
    return cli(["generate", *argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ttt_jax.trainer import run

    run_dir = tmp_path_factory.mktemp("gen") / "run"
    ttt = TTTConfig(model_dim=32, num_heads=2, mini_batch_size=8)
    cfg = RunConfig(
        model=ModelConfig(vocab_size=256, num_layers=1, intermediate_size=64, ttt=ttt),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=5),
        data=DataConfig(source="bytes", seq_len=64, batch_size=8),
        train=TrainConfig(steps=150, eval_every=150, eval_batches=1, log_every=150,
                          run_dir=str(run_dir)))
    run(cfg, print_fn=lambda *a: None)
    return run_dir


def generated(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_trained_checkpoint_generates_text_reproducibly(trained, capsys):
    args = ["--checkpoint", str(trained), "--prompt", "def ", "-n", "96", "--temperature", "0.7",
            "--samples", "4"]
    first = generated(capsys, *args, "--seed", "1")
    again = generated(capsys, *args, "--seed", "1")
    other = generated(capsys, *args, "--seed", "2")
    assert first == again and first != other
    text = "".join(part.split("\n", 1)[1][len("def "):] for part in first.split("--- sample ")[1:])
    # Trained on Python sources, the model writes mostly printable ASCII; an untrained model's
    # near-uniform bytes would be printable about 95/256 of the time.
    printable = sum(32 <= ord(c) < 127 or c == "\n" for c in text) / len(text)
    assert printable > 0.9, text
    # Indentation makes much of Python whitespace (a model this small, 150 steps, sometimes
    # writes long runs of it); the rest is words, not a stuck loop.
    visible = [c for c in text if not c.isspace()]
    assert len(visible) > 0.1 * len(text), text
    assert len(set(visible)) >= 15, text
    assert collections.Counter(visible).most_common(1)[0][1] < 0.3 * len(visible), text


def test_several_samples_and_greedy(trained, capsys):
    out = generated(capsys, "--checkpoint", str(trained), "--prompt", "import", "-n", "16",
                    "--samples", "2", "--temperature", "0")
    parts = out.split("--- sample ")
    assert len(parts) == 3 and parts[1][2:] == parts[2][2:]  # greedy: both samples equal


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "", "-n", "4"], "--prompt is empty"),
    (["--prompt", "x", "-n", "0"], "-n 0"),
    (["--prompt", "x", "--top-p", "0"], "top_p"),
])
def test_bad_arguments_name_the_field(trained, capsys, argv, match):
    assert main(["--checkpoint", str(trained), *argv]) == 2
    assert match in capsys.readouterr().err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bytes_round_trip():
    text = "héllo\n"
    assert ids_to_text(text_to_ids(text)) == text
    assert ids_to_text([0x68, 300]) == "h\ufffd"
