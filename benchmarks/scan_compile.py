"""Compile time vs depth, scanned and unrolled, side by side in one run.

    .venv/bin/python benchmarks/scan_compile.py
"""
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlm_jax.config import load_config  # noqa: E402
from vlm_jax.families import build_model, example_inputs, init_params  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/models/tiny_mllama.yaml")


def compile_seconds(layers: int, scan: bool) -> float:
    cfg = load_config(CONFIG, [f"model.text.num_layers={layers}", f"model.vision.num_layers={layers}",
                               f"model.text.cross_attention_layers={list(range(3, layers, 5))}",
                               f"model.scan_layers={str(scan).lower()}"]).model
    model = build_model(cfg)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    fn = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    start = time.perf_counter()
    fn.lower(params, example_inputs(cfg, batch=2, seq_len=32)).compile()
    return time.perf_counter() - start


def main():
    print(f"{'layers':>6} {'scanned s':>10} {'unrolled s':>11}")
    rows = {n: (compile_seconds(n, True), compile_seconds(n, False)) for n in (10, 20, 40)}
    for n, (s, u) in rows.items():
        print(f"{n:>6} {s:>10.2f} {u:>11.2f}")
    print(f"40/10 ratio: scanned {rows[40][0] / rows[10][0]:.2f}x, unrolled {rows[40][1] / rows[10][1]:.2f}x")


if __name__ == "__main__":
    main()
