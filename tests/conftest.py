"""Force 8 host devices before anything imports jax, so sharding tests see a real mesh."""
import os
import shutil
import sys
import tempfile

# Cheap CPU codegen (LLVM -O0) for every test and the subprocesses they start: compiling is most of the suite's
# time, and the programs are tiny. The numerics stay IEEE (no fast math); the benchmarks keep XLA's defaults.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache for the session, inherited by the `vlm-jax` subprocesses: tests compile the
# same train steps many times over, and compiling is most of their time. XLA_FLAGS are part of the cache key, so
# runs with other flags (another device count) keep their own entries. A cache dir of the caller's is kept.
_SESSION_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="vlm_jax_jit_")
if _SESSION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_mllama_dir(tmp_path_factory):
    """A tiny random HF Mllama (non-zero gates) saved as an official checkpoint is; returns (torch model, dir).

    config.json holds the vision indices in Meta's convention (TINY_VISION's [1, 3], the state entering layer i),
    as every Llama 3.2 Vision config.json does. transformers 5.x reads an index as layer i's output, so the torch
    reference is built with [0, 2] to compute that same model."""
    import json

    from hf_models import TINY_VISION, tiny_mllama
    meta = TINY_VISION["intermediate_layers_indices"]
    model = tiny_mllama(vision={"intermediate_layers_indices": [i - 1 for i in meta]})
    path = tmp_path_factory.mktemp("hf_mllama")
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["intermediate_layers_indices"] = meta
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return model, str(path)


@pytest.fixture(scope="session")
def trained_like(tmp_path_factory):
    """A tiny Mllama (random, gates open so the image matters) with a tokenizer trained on the embedded tasks,
    saved as a checkpoint with that tokenizer in its config: (cfg, model, params, tokenizer, checkpoint dir)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from train_helpers import TINY
    from vlm_jax.config import Config, load_config
    from vlm_jax.data import task_texts, train_sentencepiece
    from vlm_jax.families import build_model, init_params
    from vlm_jax.train import checkpoint
    root = tmp_path_factory.mktemp("infer")
    tokenizer_path = str(root / "tokenizer.model")
    tokenizer = train_sentencepiece(task_texts(), vocab_size=128, path=tokenizer_path)
    cfg = load_config(TINY, [f"model.image_token_index={tokenizer.image_id}", f"data.tokenizer={tokenizer_path}",
                             "data.shapes={batch_size: 4, seq_len: 32, max_images: 1}",
                             "model.text.cross_attention_gate_init=0.8"])
    model = build_model(cfg.model)
    params = jax.tree.map(np.asarray, jax.device_get(jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(
        jax.random.PRNGKey(3))))
    ckpt = str(root / "ckpt")
    checkpoint.save_params(ckpt, params, Config(model=cfg.model, data=cfg.data))
    return cfg, model, params, tokenizer, ckpt
