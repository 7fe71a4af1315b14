"""The same prompts answered by transformers' PyTorch `generate` on an exported model (needs the [torch] extra).

Prompt batches come from `Answerer.prompts`, so both sides see identical ids, masks and pixels.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.infer.generate import Sampling


def load_hf_mllama(hf_dir: str):
    from transformers import MllamaForConditionalGeneration
    return MllamaForConditionalGeneration.from_pretrained(hf_dir).eval()


def torch_batch(prompts: dict) -> dict:
    """A prompt batch as transformers' Mllama takes it (prompt_mask is the attention mask)."""
    import torch
    inputs = dict(prompts)
    inputs["attention_mask"] = inputs.pop("prompt_mask")
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


def hf_generate(hf_model, prompts: dict, sampling: Sampling) -> np.ndarray:
    """Greedy new tokens (B, max_new_tokens), padded with `sampling.pad_token` after each row's stop token,
    the layout `vlm_jax.infer.generate` returns."""
    import torch
    if sampling.temperature != 0.0:
        raise ValueError("hf_generate compares greedy decoding only")
    inputs = torch_batch(prompts)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                eos_token_id=list(sampling.stop_tokens), pad_token_id=sampling.pad_token)
    new = out[:, inputs["input_ids"].shape[1]:].numpy().astype(np.int32)
    return np.pad(new, ((0, 0), (0, sampling.max_new_tokens - new.shape[1])), constant_values=sampling.pad_token)
