"""LlavaForConditionalGeneration (CLIP or SigLIP tower) <-> UnifiedVLM (hf_layouts.md B).

Exports the 4.x on-disk layout (`vision_tower.vision_model.*`, `language_model.model.*`); imports it, the
5.x one (`vision_tower.*` without `vision_model.`) and the in-memory `model.`-prefixed names."""
from __future__ import annotations

from vlm_jax.config import ImageConfig, ModelConfig, deep_merge, load_model_config
from vlm_jax.convert import llama
from vlm_jax.convert.keymap import COPY, LINEAR, Rule, Stack
from vlm_jax.convert.vit import encoder_stack, vit_from_hf, vit_rules, vit_to_hf
from vlm_jax.data.spec import InputSpec
from vlm_jax.errors import ConversionError

MODEL_TYPE = "llava"
TOWER = "vision_tower.vision_model"

COMPONENTS = [
    ("vision_tower", r"vision/"),
    ("projector", r"connector/"),
] + llama.TEXT_COMPONENTS


def rules(cfg: ModelConfig) -> list[Rule]:
    out = vit_rules(cfg.vit, "vision", TOWER)
    for ours, hf in (("fc1", "linear_1"), ("fc2", "linear_2")):
        out.append(Rule(f"connector/projector/{ours}/kernel", f"multi_modal_projector.{hf}.weight", LINEAR))
        if cfg.connector.bias:
            out.append(Rule(f"connector/projector/{ours}/bias", f"multi_modal_projector.{hf}.bias", COPY))
    return out + llama.text_rules(cfg, "language_model.model", "language_model.lm_head.weight")


def stacks(cfg: ModelConfig) -> list[Stack]:
    return [encoder_stack("vision", cfg.vit.num_layers)] + llama.text_stacks(cfg) if cfg.scan_layers else []


def normalize_hf_keys(tensors: dict) -> dict:
    out = {}
    for k, a in tensors.items():
        k = k[len("model."):] if k.startswith("model.") else k
        if k.startswith("language_model.") and not k.startswith(("language_model.model.", "language_model.lm_head.")):
            k = "language_model.model." + k[len("language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("vision_tower.") and not k.startswith(TOWER + "."):
            k = TOWER + k[len("vision_tower"):]
        out[k] = a
    return out


def config_from_hf(hf: dict, where: str, **overrides) -> ModelConfig:
    vc = hf.get("vision_config") or {}
    if vc.get("model_type") not in ("clip_vision_model", "siglip_vision_model"):
        raise ConversionError(f"{where} vision_config: model_type '{vc.get('model_type')}' is not supported; "
                              "use clip_vision_model or siglip_vision_model")
    layers = hf.get("vision_feature_layer", -2)
    data = {
        "family": "llava",
        "image_token_index": hf.get("image_token_index", hf.get("image_token_id", 32000)),
        "vit": vit_from_hf(vc),
        "connector": {
            "kind": "mlp",
            "feature_layers": layers if isinstance(layers, list) else [layers],
            "feature_strategy": hf.get("vision_feature_select_strategy", "default"),
            "hidden_act": hf.get("projector_hidden_act", "gelu"),
            "bias": hf.get("multimodal_projector_bias", True),
        },
        "text": llama.text_from_hf(hf.get("text_config") or {}, f"{where} text_config"),
    }
    return load_model_config(deep_merge(data, overrides))


def config_to_hf(cfg: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    c = cfg.connector
    layers = list(c.feature_layers)
    return llama.merge_config(base, {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "image_token_index": cfg.image_token_index,
        "projector_hidden_act": c.hidden_act,
        "multimodal_projector_bias": c.bias,
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": c.feature_strategy,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "torch_dtype": dtype,
        "text_config": llama.text_to_hf(cfg.text, dtype),
        "vision_config": vit_to_hf(cfg.vit, f"{cfg.vit.kind}_vision_model", dtype),
    })


generation_config = llama.generation_config


def hf_processor(cfg: ModelConfig, spec: InputSpec, image: ImageConfig):
    """(processor class, (image processor class, its settings), processor_config.json fields) preparing images as
    the `resize` op does (shortest edge bicubic, centred crop, rescale, normalise); LlavaProcessor expands each image
    token to the tower's patch count, plus its class token, minus it again under the 'default' strategy."""
    if image.op != "resize":
        raise ConversionError(f"data.image.op '{image.op}': LLaVA's HF image processor prepares images as 'resize'")
    v = cfg.vit
    side = v.image_size
    return "LlavaProcessor", ("CLIPImageProcessor", dict(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": side}, resample=3, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(spec.image_mean), image_std=list(spec.image_std))), dict(
        patch_size=v.patch_size, vision_feature_select_strategy=cfg.connector.feature_strategy,
        num_additional_image_tokens=1 if v.kind == "clip" else 0)
