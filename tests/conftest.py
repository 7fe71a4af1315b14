"""Force 8 host devices before anything imports jax, so sharding tests see a real mesh."""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_mllama_dir(tmp_path_factory):
    """A tiny random HF Mllama (non-zero gates) saved with save_pretrained; returns (torch model, dir)."""
    from hf_models import tiny_mllama
    model = tiny_mllama()
    path = tmp_path_factory.mktemp("hf_mllama")
    model.save_pretrained(path)
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
