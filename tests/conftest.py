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
