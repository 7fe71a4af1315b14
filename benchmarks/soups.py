"""Model soups against their ingredients on the demo's held-out tasks: three short fine-tunes of the trained demo
(`make demo`) with different learning rates and data orders, then `vlm-jax soup` greedy, average and max, and
`vlm-jax eval` of the starting checkpoint.

    python benchmarks/soups.py [--base workdirs/demo/checkpoints/800] [--out /tmp/soups] [--steps 60] [--limit 40]

Prints each command's table (held-out exact-match accuracy averaged over the 6 tasks, first --limit records of
each; answer perplexity). Measured ~18 min on a loaded 2-core CPU (13 of them training).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

LEARNING_RATES = ("1e-3", "3e-4", "1e-4")


def cli(*argv: str):
    print("$ vlm-jax " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "vlm_jax.cli", *argv], check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="workdirs/demo/checkpoints/800")
    p.add_argument("--out", default="/tmp/soups")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--limit", type=int, default=40)
    args = p.parse_args()
    base = os.path.abspath(args.base)
    tokenizer = f"data.tokenizer={os.path.join(os.path.dirname(os.path.dirname(base)), 'tokenizer.model')}"
    runs = [os.path.join(args.out, f"lr{lr}") for lr in LEARNING_RATES]
    for seed, (lr, workdir) in enumerate(zip(LEARNING_RATES, runs), start=1):
        cli("train", "--config", "configs/demo.yaml", f"workdir={workdir}", f"train.init_from={base}", tokenizer,
            f"train.steps={args.steps}", f"train.schedule.learning_rate={lr}", "train.schedule.warmup_steps=5",
            "train.eval_every=0", f"train.checkpoint.every_steps={args.steps}", f"data.seed={seed}")
    scoring = ("--eval-config", "configs/demo.yaml", "--limit", str(args.limit), "--batch-size", "40")
    for method in ("greedy", "average", "max"):
        cli("soup", "--checkpoints", *(os.path.join(r, "checkpoints") for r in runs), "--method", method,
            *scoring, "--out", os.path.join(args.out, f"soup_{method}"), tokenizer)
    cli("eval", "--config", "configs/demo.yaml", "--checkpoint", base, *scoring[2:], tokenizer)


if __name__ == "__main__":
    main()
