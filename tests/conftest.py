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
