"""CLIP / SigLIP encoder towers: per-layer key maps and vision_config mapping, shared by the LLaVA, Idefics3,
CLIP and SigLIP conversions (hf_layouts.md B, C)."""
from __future__ import annotations

from vlm_jax.config import ViTConfig
from vlm_jax.convert.keymap import CONV, COPY, FC_MLP, FLAT, LINEAR, LINEAR_HEADS_IN, Rule, Stack, layer_norm

ENCODER_LAYER = [(f"self_attn/{p}_proj/{w}", f"self_attn.{p}_proj.{hw}", t)
                 for p in "qkv" for w, hw, t in (("kernel", "weight", LINEAR), ("bias", "bias", FLAT))] + [
    ("self_attn/o_proj/kernel", "self_attn.out_proj.weight", LINEAR_HEADS_IN),
    ("self_attn/o_proj/bias", "self_attn.out_proj.bias", COPY),
    *layer_norm("input_layernorm", "layer_norm1"), *layer_norm("post_attention_layernorm", "layer_norm2"), *FC_MLP]
POOLING_HEAD = [
    ("probe", "probe", COPY),
    ("in_proj/kernel", "attention.in_proj_weight", LINEAR),
    ("in_proj/bias", "attention.in_proj_bias", FLAT),
    ("out_proj/kernel", "attention.out_proj.weight", LINEAR_HEADS_IN),
    ("out_proj/bias", "attention.out_proj.bias", COPY),
    *layer_norm("layernorm", "layernorm"), *FC_MLP]


def encoder_rules(ours: str, hf: str, num_layers: int) -> list[Rule]:
    """`ours`/encoder/layers_i/... <-> `hf`.encoder.layers.i...."""
    return [Rule(f"{ours}/encoder/layers_{i}/{o}", f"{hf}.encoder.layers.{i}.{h}", t)
            for i in range(num_layers) for o, h, t in ENCODER_LAYER]


def encoder_stack(ours: str, num_layers: int) -> Stack:
    return Stack(f"{ours}/encoder/", num_layers, lambda b: f"{ours}/encoder/layers_{b}/")


def vit_rules(v: ViTConfig, ours: str, hf: str) -> list[Rule]:
    top = [("patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
           ("position_embedding", "embeddings.position_embedding.weight", COPY),
           *layer_norm("post_layernorm", "post_layernorm")]
    if v.class_token:
        top += [("class_embedding", "embeddings.class_embedding", COPY),
                *layer_norm("pre_layernorm", "pre_layrnorm")]  # sic: transformers' spelling
    else:
        top.append(("patch_embedding/bias", "embeddings.patch_embedding.bias", COPY))
    if v.pooling_head:
        top += [(f"head/{o}", f"head.{h}", t) for o, h, t in POOLING_HEAD]
    return [Rule(f"{ours}/{o}", f"{hf}.{h}", t) for o, h, t in top] + encoder_rules(ours, hf, v.num_layers)


HF_VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "idefics3_vision": "siglip"}


def vit_from_hf(vc: dict, kind: str | None = None) -> dict:
    """A transformers vision_config -> ViTConfig fields; `kind` defaults from its model_type."""
    kind = kind or HF_VISION_TYPES.get(vc.get("model_type"), "clip")
    defaults = ViTConfig(kind=kind, norm_eps=1e-5 if kind == "clip" else 1e-6,
                         hidden_act="quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    return {
        "kind": kind,
        "hidden_size": vc.get("hidden_size", 768),
        "intermediate_size": vc.get("intermediate_size", 3072),
        "num_layers": vc.get("num_hidden_layers", 12),
        "num_heads": vc.get("num_attention_heads", 12),
        "num_channels": vc.get("num_channels", 3),
        "image_size": vc.get("image_size", 224),
        "patch_size": vc.get("patch_size", 32 if kind == "clip" else 16),
        "norm_eps": vc.get("layer_norm_eps", defaults.norm_eps),
        "hidden_act": vc.get("hidden_act", defaults.hidden_act),
        "pooling_head": kind == "siglip" and vc.get("vision_use_head", True)
                        and vc.get("model_type") != "idefics3_vision",
    }


def vit_to_hf(v: ViTConfig, model_type: str, dtype: str) -> dict:
    out = {
        "model_type": model_type,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "layer_norm_eps": v.norm_eps,
        "hidden_act": v.hidden_act,
        "torch_dtype": dtype,
    }
    if model_type == "siglip_vision_model":
        out["vision_use_head"] = v.pooling_head
    return out
