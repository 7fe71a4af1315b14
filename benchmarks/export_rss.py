"""Peak host memory (RSS) of `vlm-jax export`: streamed from the checkpoint vs restoring the whole tree first.

    python benchmarks/export_rss.py [--config configs/models/mllama_100m.yaml] [--max-shard-size 16MiB]

Saves a random checkpoint of the config's model, then runs, each in a fresh subprocess whose peak RSS is read
from os.wait4: `baseline` (import jax + vlm_jax, start the CPU backend, nothing else), `stream` (`vlm-jax export`,
which reads one parameter at a time) and `whole` (restore_params, then to_hf of the in-memory tree: the export
before streaming). Prints each peak, its excess over the baseline, and that excess over the model's fp32 bytes;
the two exports are checked byte-identical. `--before DIR` adds `whole-before`: `whole` run on another checkout,
e.g. the commit before streaming, whose to_hf also built every HF tensor in one dict:

    git archive 0ed597c | tar -x -C /tmp/before && python benchmarks/export_rss.py --before /tmp/before
"""
from __future__ import annotations

import argparse
import filecmp
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

SNIPPETS = {
    "baseline": "import jax, vlm_jax.cli, vlm_jax.convert, vlm_jax.train.checkpoint; jax.devices()",
    "whole": ("import sys; from vlm_jax.convert import to_hf; from vlm_jax.families import build_model; "
              "from vlm_jax.train import checkpoint\n"
              "ckpt, out, size = sys.argv[1:]\n"
              "config, _, _ = checkpoint.read_meta(ckpt)\n"
              "to_hf(build_model(config.model), checkpoint.restore_params(ckpt), out, max_shard_bytes=int(size))"),
}


def peak_rss(argv: list[str], code: str) -> tuple[int, str]:
    """Peak resident bytes of `argv` run as a child process (Linux reports ru_maxrss in KiB). Linux carries the
    high-water mark across fork + exec, so this parent stays small: it never imports jax."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=code)
    proc = subprocess.Popen(argv, env=env, cwd=code, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed with exit code {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss * 1024, stdout.decode()


def save(config: str, ckpt: str):
    """Saves a random checkpoint of `config`'s model; prints its fp32 bytes and its largest array's."""
    import flax.linen as nn
    import jax
    import numpy as np

    from vlm_jax.config import load_config
    from vlm_jax.families import abstract_params, build_model
    from vlm_jax.train import checkpoint
    cfg = load_config(config, [])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype),
                          nn.meta.unbox(abstract_params(build_model(cfg.model))))
    checkpoint.save_params(ckpt, params, cfg)
    sizes = [math.prod(a.shape) * 4 for a in jax.tree.leaves(params)]
    print(sum(sizes), max(sizes))


def main():
    from vlm_jax.cli import _size  # the CLI module imports nothing heavy at the top

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/models/mllama_100m.yaml")
    p.add_argument("--max-shard-size", default="16MiB")
    p.add_argument("--before", default="", help="also run `whole` on this checkout (an older commit)")
    p.add_argument("--save", default="", help=argparse.SUPPRESS)  # the child that writes the checkpoint
    args = p.parse_args()
    config = os.path.join(ROOT, args.config)
    if args.save:
        return save(config, args.save)
    shard_bytes = str(_size(args.max_shard_size, "--max-shard-size"))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        _, sizes = peak_rss([sys.executable, os.path.abspath(__file__), "--config", config, "--save", ckpt], ROOT)
        fp32, largest = map(int, sizes.split())
        print(f"{args.config}: {fp32 / MiB:.0f} MiB of fp32 parameters (largest array {largest / MiB:.0f} MiB), "
              f"export with --max-shard-size {args.max_shard_size}")
        runs = {"baseline": (SNIPPETS["baseline"], ROOT), "stream": (None, ROOT), "whole": (SNIPPETS["whole"], ROOT)}
        if args.before:
            runs["whole-before"] = (SNIPPETS["whole"], os.path.abspath(args.before))
        peaks = {}
        for mode, (snippet, code) in runs.items():
            out = os.path.join(tmp, mode)
            argv = ([sys.executable, "-c", snippet, ckpt, out, shard_bytes] if snippet else
                    [sys.executable, "-m", "vlm_jax.cli", "export", "--checkpoint", ckpt, "--out", out,
                     "--max-shard-size", args.max_shard_size])
            peaks[mode], _ = peak_rss(argv, code)
        base = peaks["baseline"]
        print(f"{'mode':<12} {'peak RSS':>10} {'over baseline':>14} {'/ fp32 model':>13}")
        for mode, peak in peaks.items():
            extra = peak - base
            print(f"{mode:<12} {peak / MiB:>6.0f} MiB {extra / MiB:>10.0f} MiB {extra / fp32:>12.2f}x")
        a, b = os.path.join(tmp, "stream"), os.path.join(tmp, "whole")
        names = sorted(os.listdir(a))
        same = names == sorted(os.listdir(b)) and \
            all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)
        print(f"stream and whole exports byte-identical ({len(names)} files): {same}")


if __name__ == "__main__":
    main()
