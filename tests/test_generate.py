"""Generation with a KV cache against transformers' generate, plus sampling and stopping behaviour."""
import jax
import numpy as np
import torch

from hf_models import mllama_batch, torch_inputs
from vlm_jax.convert import from_hf
from vlm_jax.infer.generate import Sampling, generate


def test_greedy_equals_transformers_generate(hf_mllama_dir):
    hf_model, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32")
    batch = mllama_batch()  # two rows with images, one text-only row
    ours = np.asarray(generate(model, params, batch, Sampling(max_new_tokens=10)))
    with torch.no_grad():
        ref = hf_model.generate(**torch_inputs(batch), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=0).numpy()[:, batch["input_ids"].shape[1]:]
    np.testing.assert_array_equal(ours, ref)


def test_left_padded_prompt_generates_as_if_alone(hf_mllama_dir):
    model, params = from_hf(hf_mllama_dir[1], dtype="float32")
    batch = mllama_batch()
    alone = {k: v[1:2, 2:] if k in ("input_ids", "cross_attention_mask") else v[1:2] for k, v in batch.items()}
    padded = {k: v[1:2].copy() for k, v in batch.items()}
    padded["input_ids"][:, :2] = 0
    padded["cross_attention_mask"][:, :2] = 0
    padded["prompt_mask"] = np.array([[0, 0] + [1] * 14])
    s = Sampling(max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(generate(model, params, padded, s)),
                                  np.asarray(generate(model, params, alone, s)))


def test_sampling_modes_and_stop_tokens(hf_mllama_dir):
    model, params = from_hf(hf_mllama_dir[1], dtype="float32")
    batch = mllama_batch()
    greedy = np.asarray(generate(model, params, batch, Sampling(max_new_tokens=6)))
    top1 = np.asarray(generate(model, params, batch, Sampling(temperature=1.0, top_k=1, max_new_tokens=6)))
    np.testing.assert_array_equal(top1, greedy)
    hot = Sampling(temperature=5.0, top_p=0.9, max_new_tokens=6)
    a = np.asarray(generate(model, params, batch, hot, jax.random.PRNGKey(1)))
    b = np.asarray(generate(model, params, batch, hot, jax.random.PRNGKey(1)))
    c = np.asarray(generate(model, params, batch, hot, jax.random.PRNGKey(2)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    stop = int(greedy[0, 2])
    stopped = np.asarray(generate(model, params, batch, Sampling(max_new_tokens=6, stop_tokens=(stop,), pad_token=-1)))
    first = int(np.argmax(greedy[0] == stop))
    np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])
    assert (stopped[0, first + 1:] == -1).all()
