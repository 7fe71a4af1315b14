"""MllamaForConditionalGeneration <-> CrossAttentionVLM: config mapping and the key map (hf_layouts.md A)."""
from __future__ import annotations

from dataclasses import replace

from vlm_jax.config import ImageConfig, MllamaVisionConfig, ModelConfig, deep_merge, load_model_config
from vlm_jax.convert.keymap import (CONV, COPY, FC_MLP, FLATTEN_TAIL, LINEAR, LINEAR_HEADS_IN, Rule, Stack,
                                    layer_norm)
from vlm_jax.convert.llama import (TEXT_COMMON, TEXT_SELF, generation_config,  # noqa: F401 (family API)
                                   merge_config, text_from_hf, text_to_hf)
from vlm_jax.data.spec import InputSpec
from vlm_jax.errors import ConversionError
from vlm_jax.models.text import layer_layout

MODEL_TYPE = "mllama"
# The vision_config field naming the convention of intermediate_layers_indices (MllamaVisionConfig): export writes
# it, import reads it. Without it the indices are Meta's ("input"), as in every official checkpoint's config.json.
LAYER_CONVENTION_KEY = "vlm_jax_intermediate_layers_convention"
LAYER_CONVENTION_READERS = {"input": "Meta's reference and transformers 4.x", "output": "transformers 5.x"}
# Export's default: the transformers this project pins (5.23) then computes the model that was trained.
EXPORT_LAYER_CONVENTION = "output"
MLLAMA_TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                            num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                            max_position_embeddings=131072, pad_token_id=128004, bos_token_id=128000,
                            eos_token_id=128001)

COMPONENTS = [  # (label, regex over per-layer parameter paths) for `vlm-jax info`; first match wins
    ("vision.embeddings", r"vision/(patch_embedding|class_embedding|position_|tile_position_|pre_tile_|layernorm_pre)"),
    ("vision.local_layers", r"vision/transformer/"),
    ("vision.global_layers", r"vision/(global_transformer/|post_tile_|layernorm_post)"),
    ("projector", r"projector/"),
    ("text.embed_tokens", r"text/embed_tokens/"),
    ("text.cross_attention_layers", r"text/decoder/layer_\d+/(cross_attn|attn_gate|mlp_gate)"),
    ("text.self_attention_layers", r"text/(decoder|norm)/"),
    ("text.lm_head", r"text/lm_head/"),
]

VISION_LAYER = [
    ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", LINEAR),
    ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", LINEAR),
    ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", LINEAR),
    ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", LINEAR_HEADS_IN),
    *FC_MLP, *layer_norm("input_layernorm", "input_layernorm"),
    *layer_norm("post_attention_layernorm", "post_attention_layernorm"),
]
VISION_GLOBAL_GATES = [("gate_attn", "gate_attn", COPY), ("gate_ffn", "gate_ffn", COPY)]

VISION_TOP = [
    ("patch_embedding/kernel", "patch_embedding.weight", CONV),
    ("class_embedding", "class_embedding", COPY),
    ("position_embedding", "gated_positional_embedding.embedding", COPY),
    ("position_gate", "gated_positional_embedding.gate", COPY),
    ("tile_position_embedding", "gated_positional_embedding.tile_embedding.weight", FLATTEN_TAIL),
    ("pre_tile_embedding", "pre_tile_positional_embedding.embedding.weight", FLATTEN_TAIL),
    ("pre_tile_gate", "pre_tile_positional_embedding.gate", COPY),
    ("post_tile_embedding", "post_tile_positional_embedding.embedding.weight", FLATTEN_TAIL),
    ("post_tile_gate", "post_tile_positional_embedding.gate", COPY),
    *layer_norm("layernorm_pre", "layernorm_pre"), *layer_norm("layernorm_post", "layernorm_post"),
]

TEXT_CROSS = [(f"cross_attn/{p}_proj/kernel", f"cross_attn.{p}_proj.weight", LINEAR) for p in "qkv"] + [
    ("cross_attn/o_proj/kernel", "cross_attn.o_proj.weight", LINEAR_HEADS_IN),
    ("cross_attn/q_norm/scale", "cross_attn.q_norm.weight", COPY),
    ("cross_attn/k_norm/scale", "cross_attn.k_norm.weight", COPY),
    ("attn_gate", "cross_attn_attn_gate", COPY),
    ("mlp_gate", "cross_attn_mlp_gate", COPY),
]


def rules(cfg: ModelConfig) -> list[Rule]:
    v, t = cfg.vision, cfg.text
    out = [Rule(f"vision/{o}", f"vision_model.{h}", tr) for o, h, tr in VISION_TOP]
    for i in range(v.num_layers):
        out += [Rule(f"vision/transformer/layers_{i}/{o}", f"vision_model.transformer.layers.{i}.{h}", tr)
                for o, h, tr in VISION_LAYER]
    for i in range(v.num_global_layers):
        out += [Rule(f"vision/global_transformer/layers_{i}/{o}", f"vision_model.global_transformer.layers.{i}.{h}",
                     tr) for o, h, tr in VISION_LAYER + VISION_GLOBAL_GATES]
    out += [Rule("projector/kernel", "multi_modal_projector.weight", LINEAR),
            Rule("projector/bias", "multi_modal_projector.bias", COPY),
            Rule("text/embed_tokens/embedding", "language_model.model.embed_tokens.weight", COPY),
            Rule("text/norm/scale", "language_model.model.norm.weight", COPY)]
    for i in range(t.num_layers):
        kind = TEXT_CROSS if i in t.cross_attention_layers else TEXT_SELF
        out += [Rule(f"text/decoder/layer_{i}/{o}", f"language_model.model.layers.{i}.{h}", tr)
                for o, h, tr in TEXT_COMMON + kind]
    if not t.tie_word_embeddings:
        out.append(Rule("text/lm_head/kernel", "language_model.lm_head.weight", LINEAR))
    return out


def stacks(cfg: ModelConfig) -> list[Stack]:
    """How scanned subtrees unroll into the per-layer paths `rules` uses."""
    if not cfg.scan_layers:
        return []
    v = cfg.vision
    out = [Stack("vision/transformer/", v.num_layers, lambda b: f"vision/transformer/layers_{b}/"),
           Stack("vision/global_transformer/", v.num_global_layers,
                 lambda b: f"vision/global_transformer/layers_{b}/")]
    repeats, period, _ = layer_layout(cfg)
    if repeats > 1:
        out += [Stack(f"text/decoder/layer_{j}/", repeats, lambda b, j=j: f"text/decoder/layer_{b * period + j}/")
                for j in range(period)]
    return out


def normalize_hf_keys(tensors: dict) -> dict:
    """Accepts the on-disk layout and the in-memory one of transformers >= 4.53 (`model.` prefixes)."""
    out = {}
    for k, a in tensors.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model."):
            k = k[len("model."):]
        out[k] = a
    return out


def config_from_hf(hf: dict, where: str, **overrides) -> ModelConfig:
    tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
    tw, vw = f"{where} text_config", f"{where} vision_config"
    if vc.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{vw}: hidden_act '{vc['hidden_act']}' is not supported (Mllama uses 'gelu')")
    defaults = MllamaVisionConfig()
    convention = vc.get(LAYER_CONVENTION_KEY, "input")
    if convention not in LAYER_CONVENTION_READERS:
        raise ConversionError(f"{vw}: {LAYER_CONVENTION_KEY} '{convention}' is not 'input' or 'output'")
    data = {
        "family": "mllama",
        "image_token_index": hf.get("image_token_index", 128256),
        "vision": {
            "hidden_size": vc.get("hidden_size", 1280),
            "intermediate_size": vc.get("intermediate_size", 5120),
            "num_layers": vc.get("num_hidden_layers", 32),
            "num_global_layers": vc.get("num_global_layers", 8),
            "num_heads": vc.get("attention_heads", vc.get("num_attention_heads", 16)),
            "num_channels": vc.get("num_channels", 3),
            "image_size": vc.get("image_size", 448),
            "patch_size": vc.get("patch_size", 14),
            "max_num_tiles": vc.get("max_num_tiles", 4),
            "norm_eps": vc.get("norm_eps", 1e-5),
            "intermediate_layers_indices": vc.get("intermediate_layers_indices") or [3, 7, 15, 23, 30],
            "intermediate_layers_convention": convention,
            "supported_aspect_ratios": vc.get("supported_aspect_ratios") or defaults.supported_aspect_ratios,
        },
        "text": {**text_from_hf(tc, tw, MLLAMA_TEXT_DEFAULTS), "extra_embeddings": 8,
                 "cross_attention_layers": tc.get("cross_attention_layers") or [3, 8, 13, 18, 23, 28, 33, 38]},
    }
    v_out = vc.get("vision_output_dim")
    cfg = load_model_config(deep_merge(data, overrides))
    if v_out is not None and v_out != cfg.vision.output_dim:
        raise ConversionError(f"{vw}: vision_output_dim {v_out} != hidden_size * (1 + "
                              f"len(intermediate_layers_indices)) = {cfg.vision.output_dim}")
    return cfg


def layer_indices_in(v: MllamaVisionConfig, convention: str) -> tuple[int, ...]:
    """`v.intermediate_layers_indices` naming the same encoder states in `convention`: the state entering layer i
    ("input" i) is layer i - 1's output ("output" i - 1)."""
    shift = 0 if convention == v.intermediate_layers_convention else (1 if convention == "input" else -1)
    out = tuple(i + shift for i in v.intermediate_layers_indices)
    for i, j in zip(v.intermediate_layers_indices, out):
        if not 0 <= j < v.num_layers:
            state = "the embeddings entering local layer 0" if j < 0 else "the last local layer's output"
            raise ConversionError(
                f"model.vision.intermediate_layers_indices: {i} ({state}) has no index in the '{convention}' "
                f"convention ({LAYER_CONVENTION_READERS[convention]}); export with --vision-layer-convention "
                f"{v.intermediate_layers_convention}")
    return out


def export_config(cfg: ModelConfig, vision_layer_convention: str | None) -> tuple[ModelConfig, list[str]]:
    """`cfg` with its vision indices in the convention the export is for (default EXPORT_LAYER_CONVENTION), naming
    the same layers, and a note saying which readers compute the trained model from it."""
    target = vision_layer_convention or EXPORT_LAYER_CONVENTION
    if target not in LAYER_CONVENTION_READERS:
        raise ConversionError(f"--vision-layer-convention '{target}': use 'input' ({LAYER_CONVENTION_READERS['input']})"
                              f" or 'output' ({LAYER_CONVENTION_READERS['output']})")
    v = cfg.vision
    vision = replace(v, intermediate_layers_indices=layer_indices_in(v, target), intermediate_layers_convention=target)
    other = "input" if target == "output" else "output"
    note = (f"vision_config.intermediate_layers_indices {list(vision.intermediate_layers_indices)} written in the "
            f"'{target}' convention ({LAYER_CONVENTION_KEY}): they give the trained model in "
            f"{LAYER_CONVENTION_READERS[target]}; for {LAYER_CONVENTION_READERS[other]}, export with "
            f"--vision-layer-convention {other}")
    return replace(cfg, vision=vision), [note]


def import_notes(cfg: ModelConfig) -> list[str]:
    v = cfg.vision
    state = "the state entering" if v.intermediate_layers_convention == "input" else "the output of"
    return [f"vision intermediate_layers_indices {list(v.intermediate_layers_indices)} read in the "
            f"'{v.intermediate_layers_convention}' convention (index i = {state} local layer i, as in "
            f"{LAYER_CONVENTION_READERS[v.intermediate_layers_convention]}); a checkpoint trained otherwise needs "
            "--set vision.intermediate_layers_convention=..."]


def config_to_hf(cfg: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    """config.json in the transformers 4.x form (rope_scaling + rope_theta), readable by 4.45 through 5.x.
    Fields of `base` (the imported config.json) that vlm_jax does not model are kept."""
    return merge_config(base, _config_to_hf(cfg, dtype))


def _config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "image_token_index": cfg.image_token_index,
        "torch_dtype": dtype,
        "text_config": {**text_to_hf(t, dtype, "mllama_text_model"),
                        "cross_attention_layers": list(t.cross_attention_layers)},
        "vision_config": {
            "model_type": "mllama_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_global_layers": v.num_global_layers,
            "attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "max_num_tiles": v.max_num_tiles,
            "norm_eps": v.norm_eps,
            "hidden_act": "gelu",
            "intermediate_layers_indices": list(v.intermediate_layers_indices),
            LAYER_CONVENTION_KEY: v.intermediate_layers_convention,
            "supported_aspect_ratios": [list(a) for a in v.supported_aspect_ratios],
            "vision_output_dim": v.output_dim,
            "torch_dtype": dtype,
        },
    }


def hf_processor(cfg: ModelConfig, spec: InputSpec, image: ImageConfig):
    """(processor class, (image processor class, its settings), processor_config.json fields) preparing images as
    the `mllama_tile` op does (PIL bilinear resize onto the best tile canvas, zero pad, rescale, normalise)."""
    if image.op != "mllama_tile":
        raise ConversionError(f"data.image.op '{image.op}': Mllama's HF image processor tiles as 'mllama_tile'")
    tile = cfg.vision.image_size
    return "MllamaProcessor", ("MllamaImageProcessor", dict(
        do_convert_rgb=True, do_resize=True, size={"height": tile, "width": tile}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(spec.image_mean), image_std=list(spec.image_std),
        do_pad=True, max_image_tiles=cfg.vision.max_num_tiles)), {}
