"""Scanned depth: compiling 40 layers costs about what 10 do (the body is traced once)."""
import time

import jax

from vlm_jax.config import load_config
from vlm_jax.families import build_model, example_inputs, init_params


def _compile_seconds(layers: int) -> float:
    cfg = load_config("configs/models/tiny_mllama.yaml", [
        f"model.text.num_layers={layers}", f"model.text.cross_attention_layers={list(range(3, layers, 5))}",
        f"model.vision.num_layers={layers}"]).model
    model = build_model(cfg)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    inputs = example_inputs(cfg, batch=2, seq_len=32)
    best = float("inf")
    for _ in range(2):
        fn = jax.jit(lambda p, x: model.apply({"params": p}, **x))
        start = time.perf_counter()
        fn.lower(params, inputs).compile()
        best = min(best, time.perf_counter() - start)
    return best


def test_compile_time_does_not_grow_with_depth(monkeypatch):
    import os
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shallow, deep = _compile_seconds(10), _compile_seconds(40)
    assert deep < 1.5 * shallow, (shallow, deep)
