"""Contrastive image-text objectives (CLIP's softmax, SigLIP's sigmoid) and retrieval metrics.

Written on GLOBAL arrays: called inside the jitted step on batch-sharded embeddings, the (B, B) similarity
matrix spans the whole global batch (XLA inserts the gathers), so every example's negatives come from every
device. As objectives they return LossSums(nll = loss * B, z = 0, weight = B): the step divides by `weight`,
which gives back the loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.config import TrainConfig
from vlm_jax.objectives.base import LossSums
from vlm_jax.registry import OBJECTIVES


def similarity_logits(image_embeds, text_embeds, logit_scale, logit_bias=0.0):
    """(B_text, B_image) fp32: exp(logit_scale) * <text, image> + logit_bias, embeddings unit-norm."""
    sim = jnp.einsum("td,id->ti", text_embeds.astype(jnp.float32), image_embeds.astype(jnp.float32))
    return sim * jnp.exp(logit_scale) + logit_bias


def clip_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's symmetric InfoNCE: pair i is the positive, the other B-1 of each row/column the negatives;
    the temperature exp(-logit_scale) is learned."""
    logits = similarity_logits(image_embeds, text_embeds, logit_scale)
    positives = jnp.diagonal(logits)
    text_to_image = jax.nn.logsumexp(logits, axis=1) - positives
    image_to_text = jax.nn.logsumexp(logits, axis=0) - positives
    return 0.5 * (text_to_image.mean() + image_to_text.mean())


def siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias):
    """SigLIP's pairwise sigmoid loss: each of the B*B pairs is a binary (match / no match) problem, with a
    learned scale and bias; summed over images, averaged over texts (big_vision's normalisation)."""
    logits = similarity_logits(image_embeds, text_embeds, logit_scale, logit_bias)
    labels = 2.0 * jnp.eye(logits.shape[0], logits.shape[1]) - 1.0
    return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))


def retrieval_recall(similarity, ks=(1, 5, 10)) -> dict[str, jnp.ndarray]:
    """similarity (N queries, N candidates), the match of query i being candidate i. recall@k: share of
    queries whose match ranks in the top k (ties count against the match)."""
    correct = jnp.diagonal(similarity)[:, None]
    rank = jnp.sum(similarity >= correct, axis=1) - 1
    return {f"recall@{k}": jnp.mean(rank < k) for k in ks}


def retrieval_metrics(image_embeds, text_embeds, ks=(1, 5, 10)) -> dict[str, jnp.ndarray]:
    """Text->image and image->text recall@k of paired embeddings."""
    sim = similarity_logits(image_embeds, text_embeds, 0.0)
    return {**{f"text_to_image/{k}": v for k, v in retrieval_recall(sim, ks).items()},
            **{f"image_to_text/{k}": v for k, v in retrieval_recall(sim.T, ks).items()}}


def _as_objective(loss_of_outputs):
    def objective(model, params, inputs: dict, batch: dict, train: TrainConfig) -> LossSums:
        loss = loss_of_outputs(model.apply({"params": params}, **inputs))
        rows = jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
        return LossSums(loss * rows, jnp.zeros((), jnp.float32), rows)
    return objective


OBJECTIVES.register("softmax_contrastive")(_as_objective(
    lambda out: clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])))
OBJECTIVES.register("sigmoid_contrastive")(_as_objective(
    lambda out: siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"])))
