"""Model FLOPs per training step from the config (for MFU), and nominal peak FLOP/s per device.

Forward FLOPs count 2 per multiply-accumulate of every matmul, including attention scores and values (causal
self-attention counts half its square). A training step costs 3x forward for a component with trainable
parameters (forward + activation and weight gradients), 2x for a frozen component that gradients must
still flow through (a trainable component feeds it), and 1x for a frozen component nothing upstream trains.
The vision tower runs on every padded tile (max_num_tiles per image), as the model does.
"""
from __future__ import annotations

import jax

from vlm_jax.config import ModelConfig

COMPONENTS = ("vision", "projector", "text")  # in data-flow order
# Dense bf16 peak per device (vendor figures). CPU has no such number: 1e11 is a NOMINAL placeholder so MFU
# on CPU is a relative figure only.
PEAK_FLOPS = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
              "h100": 989e12, "h200": 989e12, "a100": 312e12, "cpu": 1e11}


def forward_flops(m: ModelConfig, seq_len: int, num_images: int) -> dict[str, float]:
    """Forward FLOPs of one sample, per component."""
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

    s, hid, hd = seq_len, t.hidden_size, t.head_dim
    q_o = 2 * s * hid * t.num_heads * hd * 2
    mlp = 2 * s * 3 * hid * t.intermediate_size
    self_layer = q_o + 2 * s * hid * t.num_kv_heads * hd * 2 + mlp + 4 * s * s * t.num_heads * hd / 2
    cross_layer = (q_o + 2 * cross_tokens * hid * t.num_kv_heads * hd * 2 + mlp
                   + 4 * s * cross_tokens * t.num_heads * hd)
    n_cross = len(t.cross_attention_layers)
    text = (t.num_layers - n_cross) * self_layer + n_cross * cross_layer + 2 * s * hid * t.vocab_size
    return {"vision": float(vision), "projector": float(projector), "text": float(text)}


def train_flops_per_sample(m: ModelConfig, seq_len: int, num_images: int, trainable: frozenset[str]) -> float:
    forward = forward_flops(m, seq_len, num_images)
    total, upstream_trains = 0.0, False
    for component in COMPONENTS:
        trains = any(p.startswith(component + "/") for p in trainable)
        total += forward[component] * (3 if trains else 2 if upstream_trains else 1)
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
