"""``ttt-jax prepare`` throughput and memory against a plain single-process loop.

Generates JSON-lines text of each size (words drawn from the standard library's sources,
documents of 1-16 KB), trains a byte-level BPE tokenizer (4096 ids) on a 2 MB sample (or takes
``--tokenizer``), then times, each in its own process and in the same run:

* ``prepare`` with 1 and 2 workers (``--workers``);
* ``loop``: read the file line by line, ``tokenizer.encode`` each document, keep every id in a
  Python list, write the array at the end (what a first script does).

Each measurement is one JSON line (MB/s of input text and wall seconds after the imports,
the imports' seconds, tokens, peak RSS of the process and of its children, from
``resource.getrusage``; ``prepare``'s includes JAX, which importing ``ttt_jax`` loads) appended to
``benchmarks/results/bench_prepare.jsonl``::

    python benchmarks/bench_prepare.py --sizes 50,200 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "bench_prepare.jsonl"
MB = 1e6

CHILD = r"""
import json, resource, sys, time
mode, src, tok, out, workers = sys.argv[1:6]
t0 = time.perf_counter()
if mode == "prepare":
    from ttt_jax.prepare import PrepareOptions, prepare  # imports ttt_jax, hence JAX
else:
    from tokenizers import Tokenizer
imported = time.perf_counter()
if mode == "prepare":
    meta = prepare(PrepareOptions(inputs=(src,), out=out, tokenizer=tok, workers=int(workers),
                                  force=True, progress=False))
    tokens = sum(s["tokens"] for s in meta["splits"].values())
else:
    import numpy as np
    t = Tokenizer.from_file(tok)
    eos = t.token_to_id("<|endoftext|>")
    ids = []
    with open(src) as f:
        for line in f:
            ids += t.encode(json.loads(line)["text"], add_special_tokens=False).ids + [eos]
    np.asarray(ids, np.uint16).tofile(out + ".bin")
    tokens = len(ids)
wall = time.perf_counter() - imported
kb = lambda who: resource.getrusage(who).ru_maxrss
print(json.dumps({"wall_s": wall, "import_s": imported - t0, "tokens": tokens, "peak_rss_mb": kb(resource.RUSAGE_SELF) / 1024,
                  "children_peak_rss_mb": kb(resource.RUSAGE_CHILDREN) / 1024}))
"""


def words() -> np.ndarray:
    import os

    text = " ".join(p.read_text(errors="replace")
                    for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60])
    return np.array(sorted(set(re.findall(r"[A-Za-z_]{2,12}", text))))


def make_text(path: Path, size_mb: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    vocab = words()
    written = 0
    with open(path, "w") as f:
        while written < size_mb * MB:
            n = int(rng.integers(150, 2500))
            picks = vocab[rng.zipf(1.3, n) % len(vocab)]
            text = " ".join(picks)
            text = ".\n".join(text[i:i + 400] for i in range(0, len(text), 400))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
    return written


def train_tokenizer(sample: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = (json.loads(line)["text"] for line in open(sample))
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out))
    return out


def measure(mode: str, src: Path, tok: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(tok), str(out),
                           str(workers)], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50,200", help="MB of generated text, comma-separated")
    p.add_argument("--workers", default="1,2", help="prepare --workers values")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: train one)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_text(tmp / "sample.jsonl", 2, seed=1)
        tok = Path(args.tokenizer) if args.tokenizer else train_tokenizer(
            tmp / "sample.jsonl", tmp / "tokenizer.json")
        for size in (float(s) for s in args.sizes.split(",")):
            src = tmp / f"text_{size:g}.jsonl"
            nbytes = make_text(src, size)
            runs = [("loop", 1)] + [("prepare", int(w)) for w in args.workers.split(",")]
            for mode, workers in runs:
                r = measure(mode, src, tok, tmp / f"out_{mode}_{workers}", workers)
                record = {"bench": "prepare", "mode": mode, "workers": workers,
                          "input_mb": round(nbytes / MB, 1),
                          "mb_per_s": round(nbytes / MB / r["wall_s"], 2),
                          **{k: round(v, 2) if isinstance(v, float) else v
                             for k, v in r.items()},
                          "cpus": __import__("os").cpu_count(),
                          "python": platform.python_version(),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                print(json.dumps(record), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
