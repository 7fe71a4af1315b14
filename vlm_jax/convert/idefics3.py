"""Idefics3ForConditionalGeneration <-> UnifiedVLM with a SigLIP-style tower and the pixel-shuffle
connector (hf_layouts.md C). On disk and in memory the keys are the same (`model.*`, `lm_head.weight`)."""
from __future__ import annotations

from vlm_jax.config import ModelConfig, deep_merge, load_model_config
from vlm_jax.convert import llama
from vlm_jax.convert.keymap import LINEAR, Rule, Stack
from vlm_jax.convert.vit import encoder_stack, vit_from_hf, vit_rules, vit_to_hf

MODEL_TYPE = "idefics3"

COMPONENTS = [
    ("vision_model", r"vision/"),
    ("connector", r"connector/"),
] + llama.TEXT_COMPONENTS


def rules(cfg: ModelConfig) -> list[Rule]:
    return (vit_rules(cfg.vit, "vision", "model.vision_model")
            + [Rule("connector/proj/kernel", "model.connector.modality_projection.proj.weight", LINEAR)]
            + llama.text_rules(cfg, "model.text_model", "lm_head.weight"))


def stacks(cfg: ModelConfig) -> list[Stack]:
    return [encoder_stack("vision", cfg.vit.num_layers)] + llama.text_stacks(cfg) if cfg.scan_layers else []


def normalize_hf_keys(tensors: dict) -> dict:
    return dict(tensors)


def config_from_hf(hf: dict, where: str, **overrides) -> ModelConfig:
    data = {
        "family": "idefics3",
        "image_token_index": hf.get("image_token_id", 128257),
        "vit": vit_from_hf({"model_type": "idefics3_vision", **(hf.get("vision_config") or {})}),
        "connector": {"kind": "pixel_shuffle", "feature_layers": [], "scale_factor": hf.get("scale_factor", 2)},
        "text": llama.text_from_hf(hf.get("text_config") or {}, f"{where} text_config"),
    }
    return load_model_config(deep_merge(data, overrides))


def config_to_hf(cfg: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    return llama.merge_config(base, {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "image_token_id": cfg.image_token_index,
        "scale_factor": cfg.connector.scale_factor,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "torch_dtype": dtype,
        "text_config": llama.text_to_hf(cfg.text, dtype),
        "vision_config": vit_to_hf(cfg.vit, "idefics3_vision", dtype),
    })


generation_config = llama.generation_config
