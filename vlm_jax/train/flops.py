"""Model FLOPs per training step from the config (for MFU), and nominal peak FLOP/s per device.

Forward FLOPs count 2 per multiply-accumulate of every matmul, including attention scores and values (causal
self-attention counts half its square). A training step costs 3x forward for a component with trainable
parameters (forward + activation and weight gradients), 2x for a frozen component that gradients must
still flow through (a trainable component feeds it), and 1x for a frozen component nothing upstream trains.
The vision tower runs on every padded tile (max_num_tiles per image), as the model does; a unified (LLaVA,
Idefics3) model encodes every image slot, and its image tokens are part of the decoder's seq_len.
"""
from __future__ import annotations

import jax

from vlm_jax.config import CONTRASTIVE_FAMILIES, UNIFIED_FAMILIES, ModelConfig, TextConfig, ViTConfig

# First in the data flow: nothing upstream of them (nor of each other). A contrastive model's two towers are
# side by side: neither feeds the other.
TOWERS = ("vision", "ocr_vision", "text_encoder")  # first in the data flow: nothing upstream of them (nor of each other)
# Dense bf16 peak per device (vendor figures). CPU has no such number: 1e11 is a NOMINAL placeholder so MFU
# on CPU is a relative figure only.
PEAK_FLOPS = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
              "h100": 989e12, "h200": 989e12, "a100": 312e12, "cpu": 1e11}


def _text_flops(t: TextConfig, s: int, cross_tokens: int) -> float:
    """The decoder on `s` tokens; its cross-attention layers attend to `cross_tokens` vision tokens."""
    hid, hd = t.hidden_size, t.head_dim
    q_o = 2 * s * hid * t.num_heads * hd * 2
    mlp = 2 * s * 3 * hid * t.intermediate_size
    self_layer = q_o + 2 * s * hid * t.num_kv_heads * hd * 2 + mlp + 4 * s * s * t.num_heads * hd / 2
    cross_layer = (q_o + 2 * cross_tokens * hid * t.num_kv_heads * hd * 2 + mlp
                   + 4 * s * cross_tokens * t.num_heads * hd)
    n_cross = len(t.cross_attention_layers)
    return (t.num_layers - n_cross) * self_layer + n_cross * cross_layer + 2 * s * hid * t.vocab_size


def _vit_flops(v: ViTConfig, images: int) -> float:
    """A CLIP/SigLIP tower on `images` images. The scanned stack runs every layer, even past the feature layer
    (LLaVA's -2); the pooled output is unused by the unified models, so XLA drops SigLIP's pooling head."""
    n, h = v.num_tokens, v.hidden_size
    layer = 2 * n * (4 * h * h + 2 * h * v.intermediate_size) + 4 * n * n * h
    return images * (2 * v.patches_per_side ** 2 * v.num_channels * v.patch_size ** 2 * h + v.num_layers * layer)


def _unified_forward_flops(m: ModelConfig, seq_len: int, num_images: int) -> dict[str, float]:
    from vlm_jax.models.connectors import CONNECTORS
    from vlm_jax.models.unified import feature_tokens
    out = {"vision": _vit_flops(m.vit, num_images)}
    if m.ocr_vit is not None:
        out["ocr_vision"] = _vit_flops(m.ocr_vit, num_images)
    out["connector"] = num_images * CONNECTORS[m.connector.kind].forward_flops(m, feature_tokens(m))
    out["text"] = _text_flops(m.text, seq_len, 0)
    return {k: float(v) for k, v in out.items()}


def _contrastive_forward_flops(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """One (image, caption) pair: both towers; the projections and the B x B similarity are negligible."""
    e = m.text_encoder
    layer = 2 * seq_len * (4 * e.hidden_size ** 2 + 2 * e.hidden_size * e.intermediate_size) \
        + 4 * seq_len * seq_len * e.hidden_size
    return {"vision": float(_vit_flops(m.vit, 1)), "text_encoder": float(e.num_layers * layer)}


def forward_flops(m: ModelConfig, seq_len: int, num_images: int) -> dict[str, float]:
    """Forward FLOPs of one sample, per component (named as the parameter trees), in data-flow order.
    num_images: image slots per sample (the batch's max_images)."""
    if m.family in UNIFIED_FAMILIES:
        return _unified_forward_flops(m, seq_len, num_images)
    if m.family in CONTRASTIVE_FAMILIES:
        return _contrastive_forward_flops(m, seq_len)
    v, t = m.vision, m.text
    tiles = num_images * v.max_num_tiles
    vision_tokens = tiles * v.padded_num_patches  # per image: all tiles attend jointly
    per_image = v.max_num_tiles * v.padded_num_patches
    h = v.hidden_size
    vision_layer = 2 * vision_tokens * (4 * h * h + 2 * h * v.intermediate_size) + 4 * num_images * per_image ** 2 * h
    vision = (2 * tiles * v.num_patches * v.num_channels * v.patch_size ** 2 * h
              + (v.num_layers + v.num_global_layers) * vision_layer)
    cross_tokens = tiles * v.num_patches
    projector = 2 * cross_tokens * v.output_dim * t.hidden_size
    text = _text_flops(t, seq_len, cross_tokens)
    return {"vision": float(vision), "projector": float(projector), "text": float(text)}


def train_flops_per_sample(m: ModelConfig, seq_len: int, num_images: int, trainable: frozenset[str]) -> float:
    total, upstream_trains = 0.0, False
    for component, forward in forward_flops(m, seq_len, num_images).items():
        prefix = "text/" if component == "text_encoder" else component + "/"  # the text tower's tree is `text`
        trains = any(p.startswith(prefix) for p in trainable)
        gradient_flows = upstream_trains and component not in TOWERS
        total += forward * (3 if trains else 2 if gradient_flows else 1)
        upstream_trains |= trains
    return total


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, bool]:
    """(peak FLOP/s, nominal?) for the first device; `configured` > 0 wins."""
    if configured > 0:
        return configured, False
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, name == "cpu"
    return PEAK_FLOPS["cpu"], True
