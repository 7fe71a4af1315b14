"""`make demo`: build a small Llama 3.2 Vision in JAX, save it as a vlm_jax checkpoint, export it to a Hugging
Face directory, load that with transformers and print JAX and PyTorch logits side by side."""
from __future__ import annotations

import os
import sys

import jax
import numpy as np

from vlm_jax.config import Config, load_config
from vlm_jax.convert import to_hf
from vlm_jax.models.vlm import build_model, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_batch(cfg, seed: int = 0) -> dict:
    """Two prompts: one with a 2x2-tile image after some text, one text-only."""
    rng = np.random.default_rng(seed)
    v, s, t = cfg.vision, 12, cfg.vision.max_num_tiles
    ids = rng.integers(3, cfg.text.vocab_size, size=(2, s))
    ids[0, 2] = cfg.image_token_index
    pixels = rng.standard_normal((2, 1, t, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    cross = np.zeros((2, s, 1, t), np.int64)
    cross[0, 2:, 0, :4] = 1
    return dict(input_ids=ids, pixel_values=pixels, aspect_ratio_ids=np.array([[6], [0]]),
                aspect_ratio_mask=np.array([[[1, 1, 1, 1]], [[1, 0, 0, 0]]]), cross_attention_mask=cross)


def main() -> int:
    import torch
    from transformers import MllamaForConditionalGeneration

    from vlm_jax.train import checkpoint
    workdir = os.path.join(REPO, "workdirs", "demo")
    cfg = load_config(os.path.join(REPO, "configs/models/tiny_mllama.yaml"))
    model = build_model(cfg.model)
    params = jax.tree.map(np.asarray, jax.device_get(__import__("flax").linen.meta.unbox(
        init_params(model, jax.random.PRNGKey(0)))))
    for layer in params["text"]["decoder"].values():  # open the cross-attention gates (they start at 0)
        if "attn_gate" in layer:
            layer["attn_gate"] = np.full_like(layer["attn_gate"], 0.7)
            layer["mlp_gate"] = np.full_like(layer["mlp_gate"], 0.5)
    ckpt, hf_dir = os.path.join(workdir, "checkpoint"), os.path.join(workdir, "hf")
    if os.path.exists(workdir):
        import shutil
        shutil.rmtree(workdir)
    checkpoint.save_params(ckpt, params, Config(model=cfg.model))
    to_hf(build_model(checkpoint.read_meta(ckpt)[0].model), checkpoint.restore_params(ckpt), hf_dir)
    print(f"saved vlm_jax checkpoint {ckpt}\nexported Hugging Face directory {hf_dir}")

    batch = demo_batch(cfg.model)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, **batch))
    hf_model = MllamaForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = hf_model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}).logits.numpy()
    print("\nlast-token logits, first 6 vocabulary entries")
    print(f"{'row':<10}{'JAX (vlm_jax)':<52}PyTorch (transformers)")
    for row, name in enumerate(("image", "text-only")):
        fmt = lambda x: " ".join(f"{v:+.4f}" for v in x[row, -1, :6])
        print(f"{name:<10}{fmt(ours):<52}{fmt(theirs)}")
    diff = float(np.abs(ours - theirs).max())
    print(f"\nmax |JAX - PyTorch| over all logits: {diff:.2e}  ({'OK' if diff <= 1e-4 else 'MISMATCH'})")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
