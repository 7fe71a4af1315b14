"""The train/eval-step objective of the contrastive families (CLIP, SigLIP), as LossSums like the LM loss.

The loss is computed on the GLOBAL batch inside the jitted step: the (B, B) logits span every row on every
device (XLA gathers the batch-sharded embeddings), so each example's negatives are the whole global batch.
LossSums(nll = loss * B, z = 0, weight = B): the step divides by `weight`, which gives back the loss.
"""
from __future__ import annotations

import jax.numpy as jnp

from vlm_jax.losses.contrastive import clip_loss, siglip_loss
from vlm_jax.train.loss import LossSums

INPUTS = ("input_ids", "pixel_values", "attention_mask")


def contrastive_loss_sums(model, params, batch: dict) -> LossSums:
    out = model.apply({"params": params}, **{k: batch[k] for k in INPUTS if k in batch})
    if model.config.family == "clip":
        loss = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    else:
        loss = siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"])
    rows = jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
    return LossSums(loss * rows, jnp.zeros((), jnp.float32), rows)
