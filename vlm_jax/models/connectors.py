"""Connectors: per-image vision features -> tokens in the text embedding space (unified families).

Each connector takes one (M, T, D) feature array per vision tower and returns (M, T', text hidden);
`tokens_per_image` says T' for T tower tokens, which is what the data pipeline must put `<image>` tokens for;
`forward_flops` counts one image's matmul FLOPs (2 per multiply-accumulate) for MFU.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.config import ModelConfig, check
from vlm_jax.config.model import validate_vit
from vlm_jax.models.layers import Attention, GeluMLP, Linear, RMSNorm, SwiGLU, dtype_of, param
from vlm_jax.registry import CONNECTORS

register_connector = CONNECTORS.register


def build_connector(config: ModelConfig, name: str = "connector") -> nn.Module:
    return CONNECTORS.get(config.connector.kind)(config, name=name)


def _kw(cfg: ModelConfig):
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


def feature_width(cfg: ModelConfig) -> int:
    """Channels of one tower's selected features (several feature layers are concatenated)."""
    return cfg.vit.hidden_size * max(1, len(cfg.connector.feature_layers))


def _projector_flops(cfg: ModelConfig, tokens: int) -> float:
    hidden = cfg.text.hidden_size
    return 2.0 * tokens * (feature_width(cfg) * hidden + hidden * hidden)


def _projector(cfg: ModelConfig) -> GeluMLP:
    c, hidden = cfg.connector, cfg.text.hidden_size
    return GeluMLP(hidden, "vision_out", "mlp", c.hidden_act, out_features=hidden, out_axis="embed",
                   use_bias=c.bias, name="projector", **_kw(cfg))


class Connector(nn.Module):
    config: ModelConfig

    @staticmethod
    def validate(cfg: ModelConfig):
        """One-line ConfigError when model.connector (or the towers) cannot feed this connector."""

    @staticmethod
    def tokens_per_image(cfg: ModelConfig, tokens: int) -> int:
        """Output tokens per image for `tokens` tower tokens (token-preserving unless overridden)."""
        return tokens

    @staticmethod
    def forward_flops(cfg: ModelConfig, tokens: int) -> float:
        """Forward FLOPs for one image of `tokens` tower tokens."""
        raise NotImplementedError


@register_connector("mlp")
class MLPProjector(Connector):
    """LLaVA: linear_2(act(linear_1(x)))."""
    forward_flops = staticmethod(_projector_flops)

    @nn.compact
    def __call__(self, features):
        (x,) = features
        return _projector(self.config)(x)


@register_connector("dual_mlp")
class DualEncoderMerge(Connector):
    """POINTS: a general and an OCR tower's features, averaged with learned (softmax) weights, then the
    LLaVA projector. Weights start equal."""
    forward_flops = staticmethod(_projector_flops)

    @staticmethod
    def validate(cfg: ModelConfig):
        check(cfg.ocr_vit is not None, "model.ocr_vit must be set for connector 'dual_mlp'")
        validate_vit(cfg.ocr_vit, "model.ocr_vit")
        check((cfg.ocr_vit.hidden_size, cfg.ocr_vit.num_tokens) == (cfg.vit.hidden_size, cfg.vit.num_tokens),
              "model.ocr_vit must give as many tokens of the same width as model.vit (features are averaged)")

    @nn.compact
    def __call__(self, features):
        logits = param(self, "merge_logits", nn.initializers.zeros, (len(features),), (None,),
                       dtype_of(self.config.param_dtype))
        weights = jax.nn.softmax(logits.astype(jnp.float32))
        merged = sum(w.astype(f.dtype) * f for w, f in zip(weights, features))
        return _projector(self.config)(merged)


def pixel_shuffle(x, s: int):
    """(M, h*w, D) -> (M, h/s * w/s, s*s*D): output token (i, j), row-major, is the concatenation over a < s,
    then b < s, of x[i*s + a, j*s + b] (transformers' Idefics3 order)."""
    m, n, d = x.shape
    side = math.isqrt(n)
    x = x.reshape(m, side // s, s, side // s, s, d)  # (i, a, j, b)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(m, (side // s) ** 2, s * s * d)


@register_connector("pixel_shuffle")
class PixelShuffleProjector(Connector):
    """Idefics3: s x s neighbouring patches become one token (s^2 fewer tokens), then a linear map, no bias."""

    @staticmethod
    def validate(cfg: ModelConfig):
        s, side = cfg.connector.scale_factor, cfg.vit.patches_per_side
        check(s > 0 and side % s == 0 and not cfg.vit.class_token,
              f"model.connector.scale_factor ({s}) must divide the {side}x{side} patch grid of a tower without a "
              "class token")

    @staticmethod
    def tokens_per_image(cfg: ModelConfig, tokens: int) -> int:
        return tokens // cfg.connector.scale_factor ** 2

    @staticmethod
    def forward_flops(cfg: ModelConfig, tokens: int) -> float:
        return 2.0 * tokens * feature_width(cfg) * cfg.text.hidden_size  # s^2 x fewer tokens, s^2 x wider

    @nn.compact
    def __call__(self, features):
        (x,) = features
        x = pixel_shuffle(x, self.config.connector.scale_factor)
        return Linear(self.config.text.hidden_size, ("vision_out", "embed"), name="proj", **_kw(self.config))(x)


@register_connector("perceiver")
class PerceiverResampler(Connector):
    """Idefics2/Flamingo style: `num_latents` learned queries cross-attend to the projected features and to
    themselves, layer by layer, so every image costs a fixed number of tokens whatever its patch count."""

    @staticmethod
    def validate(cfg: ModelConfig):
        c = cfg.connector
        check(c.num_latents > 0 and cfg.text.hidden_size % c.num_heads == 0,
              f"model.connector: num_latents must be positive and num_heads ({c.num_heads}) must divide "
              f"model.text.hidden_size ({cfg.text.hidden_size})")

    @staticmethod
    def tokens_per_image(cfg: ModelConfig, tokens: int) -> int:
        return cfg.connector.num_latents

    @staticmethod
    def forward_flops(cfg: ModelConfig, tokens: int) -> float:
        h, latents = cfg.text.hidden_size, cfg.connector.num_latents
        context = tokens + latents
        layer = (2 * latents * h * h * 2  # q and o projections
                 + 2 * context * h * h * 2  # k and v projections of features + latents
                 + 4 * latents * context * h  # scores and values
                 + 2 * latents * 3 * h * cfg.text.intermediate_size)  # SwiGLU
        return 2.0 * tokens * feature_width(cfg) * h + cfg.connector.num_layers * layer

    @nn.compact
    def __call__(self, features):
        (x,) = features
        cfg, c, kw = self.config, self.config.connector, _kw(self.config)
        hidden, eps = cfg.text.hidden_size, cfg.text.rms_norm_eps
        x = Linear(hidden, ("vision_out", "embed"), name="input_proj", **kw)(x)
        latents = param(self, "latents", nn.initializers.normal(1.0), (c.num_latents, hidden), (None, "embed"),
                        kw["param_dtype"])
        h = jnp.broadcast_to(latents.astype(x.dtype), (x.shape[0], *latents.shape))
        head_dim = hidden // c.num_heads
        for i in range(c.num_layers):
            attn = Attention(hidden, c.num_heads, c.num_heads, head_dim, "embed", "heads", "heads",
                             name=f"attn_{i}", **kw)
            q = RMSNorm("embed", eps, name=f"latents_norm_{i}", **kw)(h)
            context = jnp.concatenate([RMSNorm("embed", eps, name=f"context_norm_{i}", **kw)(x), q], axis=1)
            k, v = attn.project_kv(context)
            h = h + attn.attend(attn.project_q(q), k, v, None)
            h = h + SwiGLU(cfg.text.intermediate_size, name=f"mlp_{i}", **kw)(
                RMSNorm("embed", eps, name=f"mlp_norm_{i}", **kw)(h))
        return RMSNorm("embed", eps, name="norm", **kw)(h)
