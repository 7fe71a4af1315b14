"""CLIPModel / SiglipModel <-> ContrastiveDualEncoder. Both write `text_model.*` and `vision_model.*` with
the same encoder layer names; CLIP adds bias-free projections, SigLIP a text head and logit_bias."""
from __future__ import annotations

from vlm_jax.config import ModelConfig, deep_merge, load_model_config
from vlm_jax.convert.keymap import COPY, LINEAR, Rule, Stack, layer_norm, reshaped
from vlm_jax.convert.vit import encoder_rules, encoder_stack, vit_from_hf, vit_rules, vit_to_hf
from vlm_jax.models.contrastive import sigmoid_style

MODEL_TYPES = ("clip", "siglip")
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}

COMPONENTS = [
    ("vision_model", r"vision/"),
    ("text_model", r"text/"),
    ("projections", r"(visual_projection|text_projection)/"),
    ("logit_scale_bias", r"logit_"),
]


def rules(cfg: ModelConfig) -> list[Rule]:
    e = cfg.text_encoder
    text = [("token_embedding", "embeddings.token_embedding.weight", COPY),
            ("position_embedding", "embeddings.position_embedding.weight", COPY),
            *layer_norm("final_layer_norm", "final_layer_norm")]
    if sigmoid_style(cfg):
        text += [("head/kernel", "head.weight", LINEAR), ("head/bias", "head.bias", COPY)]
        top = [Rule("logit_scale", "logit_scale", COPY), Rule("logit_bias", "logit_bias", COPY)]
    else:
        top = [Rule("logit_scale", "logit_scale", reshaped(())),
               Rule("visual_projection/kernel", "visual_projection.weight", LINEAR),
               Rule("text_projection/kernel", "text_projection.weight", LINEAR)]
    return (vit_rules(cfg.vit, "vision", "vision_model") + [Rule(f"text/{o}", f"text_model.{h}", t) for o, h, t in text]
            + encoder_rules("text", "text_model", e.num_layers) + top)


def stacks(cfg: ModelConfig) -> list[Stack]:
    if not cfg.scan_layers:
        return []
    return [encoder_stack("vision", cfg.vit.num_layers), encoder_stack("text", cfg.text_encoder.num_layers)]


def normalize_hf_keys(tensors: dict) -> dict:
    return dict(tensors)


def config_from_hf(hf: dict, where: str, **overrides) -> ModelConfig:
    model_type = hf["model_type"]  # "clip" or "siglip": our family and tower kind have the same names
    tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
    clip = model_type == "clip"
    data = {
        "family": model_type,
        "vit": vit_from_hf({"model_type": f"{model_type}_vision_model", **vc}),
        "text_encoder": {
            "vocab_size": tc.get("vocab_size", 49408 if clip else 32000),
            "hidden_size": tc.get("hidden_size", 512 if clip else 768),
            "intermediate_size": tc.get("intermediate_size", 2048 if clip else 3072),
            "num_layers": tc.get("num_hidden_layers", 12),
            "num_heads": tc.get("num_attention_heads", 8 if clip else 12),
            "max_position_embeddings": tc.get("max_position_embeddings", 77 if clip else 64),
            "norm_eps": tc.get("layer_norm_eps", 1e-5 if clip else 1e-6),
            "hidden_act": tc.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh"),
            "eos_token_id": tc.get("eos_token_id", 49407),
            "pad_token_id": tc.get("pad_token_id", 1),
            "bos_token_id": tc.get("bos_token_id", 49406),
            "projection_dim": (hf.get("projection_dim", 512) if clip
                               else tc.get("projection_size") or tc.get("hidden_size", 768)),
        },
        "logit_scale_init": hf.get("logit_scale_init_value", 2.6592),
    }
    return load_model_config(deep_merge(data, overrides))


def config_to_hf(cfg: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    e, model_type = cfg.text_encoder, cfg.vit.kind
    text = {
        "model_type": f"{model_type}_text_model",
        "vocab_size": e.vocab_size,
        "hidden_size": e.hidden_size,
        "intermediate_size": e.intermediate_size,
        "num_hidden_layers": e.num_layers,
        "num_attention_heads": e.num_heads,
        "max_position_embeddings": e.max_position_embeddings,
        "layer_norm_eps": e.norm_eps,
        "hidden_act": e.hidden_act,
        "eos_token_id": e.eos_token_id,
        "pad_token_id": e.pad_token_id,
        "bos_token_id": e.bos_token_id,
        "torch_dtype": dtype,
    }
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "torch_dtype": dtype,
           "text_config": text, "vision_config": vit_to_hf(cfg.vit, f"{model_type}_vision_model", dtype)}
    if not sigmoid_style(cfg):
        out.update(projection_dim=e.projection_dim, logit_scale_init_value=cfg.logit_scale_init)
    else:
        text["projection_size"] = e.projection_dim
    return deep_merge(base or {}, out)


def generation_config(cfg: ModelConfig) -> dict:
    e = cfg.text_encoder
    return {"bos_token_id": e.bos_token_id, "eos_token_id": e.eos_token_id, "pad_token_id": e.pad_token_id}
