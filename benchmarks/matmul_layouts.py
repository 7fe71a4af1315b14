"""The three products of a linear layer's training step, XLA:CPU against PyTorch, one at a time, fp32.

    JAX_PLATFORMS=cpu python benchmarks/matmul_layouts.py [--rounds 5]

For each shape of `mllama_100m`'s projections at the two benchmark batches of `train_vs_pytorch.py` (256 and
1024 tokens): the forward x @ W, the input gradient dy @ W^T and the weight gradient x^T @ dy (contracting the
token dim, the leading dim of both operands), each jitted on its own (as XLA lowers it: one dot, no copy) and in
torch (one mm with a transposed view). Interleaved rounds, median; GFLOP/s and jax / torch. The weight gradient
is where the CPU step loses to PyTorch (README, "The CPU step against PyTorch").
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

PRODUCTS = {  # name: (jax function, torch function, operands from (x, w, dy))
    "forward x @ W": (lambda x, w: x @ w, lambda x, w: x @ w, lambda x, w, dy: (x, w)),
    "input grad dy @ W^T": (lambda dy, w: dy @ w.T, lambda dy, w: dy @ w.T, lambda x, w, dy: (dy, w)),
    "weight grad x^T @ dy": (lambda x, dy: x.T @ dy, lambda x, dy: x.T @ dy, lambda x, w, dy: (x, dy)),
}
SHAPES = [(tokens, d_in, d_out) for tokens in (256, 1024) for d_in, d_out in ((512, 512), (512, 2048), (2048, 512))]


def _seconds(fn, args, block, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    cases = []
    for tokens, d_in, d_out in SHAPES:
        x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((tokens, d_in), (d_in, d_out), (tokens, d_out)))
        for name, (jax_fn, torch_fn, pick) in PRODUCTS.items():
            jitted, operands = jax.jit(jax_fn), pick(x, w, dy)
            jax_args, torch_args = [jnp.asarray(a) for a in operands], [torch.from_numpy(a) for a in operands]
            jitted(*jax_args).block_until_ready()
            cases.append(((tokens, d_in, d_out), name, (jitted, jax_args), (torch_fn, torch_args),
                          2 * tokens * d_in * d_out))
    times = {i: ([], []) for i in range(len(cases))}
    for _ in range(args.rounds):
        for i, (_, _, (jf, ja), (tf, ta), _) in enumerate(cases):
            times[i][0].append(_seconds(jf, ja, lambda r: r.block_until_ready()))
            times[i][1].append(_seconds(tf, ta, lambda r: r))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__}; fp32; median of "
          f"{args.rounds} interleaved rounds (each the best of 5 calls)")
    print(f"{'tokens x in x out':>18}  {'product':22} {'jax GFLOP/s':>12} {'torch GFLOP/s':>14} {'jax/torch':>10}")
    for i, (shape, name, _, _, flop) in enumerate(cases):
        jax_s, torch_s = statistics.median(times[i][0]), statistics.median(times[i][1])
        print(f"{' x '.join(map(str, shape)):>18}  {name:22} {flop / jax_s / 1e9:12.0f} {flop / torch_s / 1e9:14.0f} "
              f"{torch_s / jax_s:9.2f}x")


if __name__ == "__main__":
    main()
