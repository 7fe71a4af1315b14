"""Scanned depth: the program for 40 layers is about the size of the one for 10 (the body is traced once), so
compiling it costs about the same (timed in benchmarks/scan_compile.py)."""
import jax

from train_helpers import TINY
from vlm_jax.config import load_config
from vlm_jax.families import build_model, example_inputs, init_params


def _program_size(layers: int, scan: bool) -> int:
    cfg = load_config(TINY, [
        f"model.text.num_layers={layers}", f"model.text.cross_attention_layers={list(range(3, layers, 5))}",
        f"model.vision.num_layers={layers}", f"model.scan_layers={str(scan).lower()}"]).model
    model = build_model(cfg)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    inputs = example_inputs(cfg, batch=2, seq_len=32)
    return len(jax.jit(lambda p, x: model.apply({"params": p}, **x)).lower(params, inputs).as_text())


def test_program_size_does_not_grow_with_depth():
    shallow, deep = _program_size(10, scan=True), _program_size(40, scan=True)
    assert deep < 1.2 * shallow, (shallow, deep)
    assert _program_size(40, scan=False) > 2 * deep  # what scanning saves: unrolled, the program grows with depth
