"""Contrastive image-text dual encoders: CLIP and SigLIP (transformers' CLIPModel / SiglipModel).

The image tower is the shared ViT; the text tower is the same pre-norm encoder stack over token + learned
position embeddings, with the text logical axes. The losses live in vlm_jax/objectives/contrastive.py."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.config import ModelConfig
from vlm_jax.models.layers import EncoderSpec, LayerNorm, Linear, constrain, dtype_of, param
from vlm_jax.models.vision import encoder_stack
from vlm_jax.models.vit import ViT


def text_encoder_spec(cfg: ModelConfig) -> EncoderSpec:
    e = cfg.text_encoder
    return EncoderSpec(e.hidden_size, e.num_heads, e.intermediate_size, e.norm_eps, e.hidden_act,
                       attention_bias=True, embed_axis="embed", heads_axis="heads", mlp_axis="mlp",
                       length_axis="length", layers_axis="layers", batch_axis="batch")


def sigmoid_style(cfg: ModelConfig) -> bool:
    """SigLIP's structure (its tower kind): bidirectional text, last-token pooling, own heads, a logit bias;
    otherwise CLIP's (causal text, eos pooling, shared projections)."""
    return cfg.vit.kind == "siglip"


def pool_index(cfg: ModelConfig, input_ids):
    """Which token represents the text: SigLIP the last one; CLIP the first eos, or the largest id when the
    config says eos is 2 (checkpoints from before transformers fixed CLIP's eos id)."""
    if sigmoid_style(cfg):
        return jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1)
    if cfg.text_encoder.eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == cfg.text_encoder.eos_token_id, axis=-1)


class TextEncoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids (B, S); attention_mask (B, S) 1 = real token (None = all). Returns the pooled (B, H)."""
        cfg, e = self.config, self.config.text_encoder
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        b, s = input_ids.shape
        tokens = param(self, "token_embedding", nn.initializers.normal(0.02), (e.vocab_size, e.hidden_size),
                       ("vocab", "embed"), kw["param_dtype"])
        positions = param(self, "position_embedding", nn.initializers.normal(0.01),
                          (e.max_position_embeddings, e.hidden_size), (None, "embed"), kw["param_dtype"])
        x = tokens.astype(kw["dtype"])[input_ids] + positions.astype(kw["dtype"])[:s]
        x = constrain(x, ("batch", "length", "act_embed"))
        keys = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        mask = jnp.broadcast_to(keys[:, None, None, :], (b, 1, s, s))
        if not sigmoid_style(cfg):
            mask = mask & jnp.tril(jnp.ones((s, s), bool))
        x, _ = encoder_stack(cfg, "encoder", text_encoder_spec(cfg), e.num_layers, vision=False)(x, mask)
        x = LayerNorm("embed", e.norm_eps, name="final_layer_norm", **kw)(x)
        pooled = x[jnp.arange(b), pool_index(cfg, input_ids)]
        if sigmoid_style(cfg):
            pooled = Linear(e.projection_dim, ("embed", "embed_out"), use_bias=True, name="head", **kw)(pooled)
        return pooled


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ContrastiveDualEncoder(nn.Module):
    """CLIP: projections without bias onto a shared width, logits scaled by exp(logit_scale).
    SigLIP: the towers' own heads, logits exp(logit_scale) * cos + logit_bias."""
    config: ModelConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.vision = ViT(cfg, cfg.vit)
        self.text = TextEncoder(cfg)
        pdtype = kw["param_dtype"]
        self.logit_scale = param(self, "logit_scale", nn.initializers.constant(cfg.logit_scale_init), (1,),
                                 (None,), pdtype)
        if not sigmoid_style(cfg):
            proj = cfg.text_encoder.projection_dim
            self.visual_projection = Linear(proj, ("vision_embed", "embed_out"), **kw)
            self.text_projection = Linear(proj, ("embed", "embed_out"), **kw)
        else:
            self.logit_bias = param(self, "logit_bias", nn.initializers.constant(cfg.logit_bias_init), (1,),
                                    (None,), pdtype)

    def encode_image(self, pixel_values):
        """(B, C, H, W) -> unit-norm fp32 (B, D)."""
        pooled = self.vision(jnp.asarray(pixel_values)).pooled
        return _normalize(pooled if sigmoid_style(self.config) else self.visual_projection(pooled))

    def encode_text(self, input_ids, attention_mask=None):
        """(B, S) -> unit-norm fp32 (B, D)."""
        pooled = self.text(jnp.asarray(input_ids), attention_mask)
        return _normalize(pooled if sigmoid_style(self.config) else self.text_projection(pooled))

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        """Returns dict(image_embeds, text_embeds, logits_per_text (B_text, B_image), logit_scale, logit_bias)
        with logit_scale/logit_bias as raw (log-space / additive) scalars, what the losses take."""
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.reshape(()).astype(jnp.float32)
        bias = self.logit_bias.reshape(()).astype(jnp.float32) if sigmoid_style(self.config) else jnp.zeros(())
        logits = text @ image.T * jnp.exp(scale) + bias
        return dict(image_embeds=image, text_embeds=text, logits_per_text=logits, logit_scale=scale,
                    logit_bias=bias)
