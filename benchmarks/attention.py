"""The XLA attention path's forward + backward on CPU against PyTorch's eager and SDPA attention, fp32.

    JAX_PLATFORMS=cpu python benchmarks/attention.py [--rounds 7]

Shapes are `mllama_100m`'s at the benchmark batches of `train_vs_pytorch.py`: the vision towers' attention
(every image's 4 tile slots of 72 patches, real or not, as both sides run them; 8 heads, no mask) and the
decoder's causal GQA self-attention (8 query heads over 4 kv heads). Interleaved rounds, median; GFLOP/s of the
six products (two forward, four backward).
transformers runs Mllama's attention through SDPA (a fused CPU kernel); ours is `layers.dot_product_attention`'s
XLA path (einsums, softmax in fp32) under JAX's autodiff.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from vlm_jax.models.layers import dot_product_attention

CASES = {  # name: (batch, seq, query heads, kv heads, head dim, causal)
    "vision towers, 2 x 4 tile slots": (2, 288, 8, 8, 64, False),
    "vision towers, 4 x 4 tile slots": (4, 288, 8, 8, 64, False),
    "decoder, 2 x 128": (2, 128, 8, 4, 64, True),
    "decoder, 4 x 256": (4, 256, 8, 4, 64, True),
}


def _jax_step(attention, q, k, v, mask, w):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask) * w), argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(grad(q, k, v))


def _torch_step(q, k, v, mask, w, sdpa: bool):
    q, k, v = (torch.from_numpy(np.array(a)).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
    w = torch.from_numpy(np.array(w)).transpose(1, 2)
    mask = None if mask is None else torch.from_numpy(np.array(mask))
    repeat = q.shape[1] // k.shape[1]

    def step():
        q.grad = k.grad = v.grad = None
        kk, vv = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        if sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        else:
            scores = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            out = torch.softmax(scores, -1) @ vv
        (out * w).sum().backward()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, (b, s, hq, hkv, d, causal) in CASES.items():
        q, w = (jnp.asarray(rng.standard_normal((b, s, hq, d)), jnp.float32) for _ in range(2))
        k, v = (jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32) for _ in range(2))
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None] if causal else None
        sides = {"vlm_jax (XLA)": _jax_step(dot_product_attention, q, k, v, mask, w),
                 "torch eager": _torch_step(q, k, v, mask, w, sdpa=False),
                 "torch sdpa": _torch_step(q, k, v, mask, w, sdpa=True)}
        rows.append((name, 3 * 4 * b * hq * s * s * d, sides))
    times = {(name, side): [] for name, _, sides in rows for side in sides}
    for name, _, sides in rows:
        for fn in sides.values():
            fn()  # compile / warm up
    for _ in range(args.rounds):
        for name, _, sides in rows:
            for side, fn in sides.items():
                start = time.perf_counter()
                fn()
                times[name, side].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__}; fp32; forward + "
          f"backward, median of {args.rounds} interleaved rounds; ms (GFLOP/s)")
    sides = list(rows[0][2])
    print(f"{'':28}" + "".join(f"{s:>20}" for s in sides) + f"{'sdpa / ours':>13}")
    for name, flop, _ in rows:
        med = {s: statistics.median(times[name, s]) for s in sides}
        cells = "".join(f"{1e3 * med[s]:>11.1f} ({flop / med[s] / 1e9:>4.0f})   " for s in sides)
        print(f"{name:28}{cells}{med['torch sdpa'] / med['vlm_jax (XLA)']:>8.2f}x")


if __name__ == "__main__":
    main()
