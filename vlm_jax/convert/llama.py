"""A plain Llama decoder inside a unified VLM (LLaVA's `language_model`, Idefics3's `text_model`): key map
and text_config mapping. Layer tables are Mllama's self-attention layers."""
from __future__ import annotations

from vlm_jax.config import ModelConfig, TextConfig, deep_merge, to_dict
from vlm_jax.convert.keymap import COPY, LINEAR, LINEAR_HEADS_IN, Rule, Stack
from vlm_jax.errors import ConversionError
from vlm_jax.models.text import layer_layout

# `vlm-jax info` labels of a Llama decoder's parameters (after any family-specific text entries).
TEXT_COMPONENTS = [
    ("text.embed_tokens", r"text/embed_tokens/"),
    ("text.layers", r"text/(decoder|norm)/"),
    ("text.lm_head", r"text/lm_head/"),
]

TEXT_COMMON = [
    ("input_layernorm/scale", "input_layernorm.weight", COPY),
    ("post_attention_layernorm/scale", "post_attention_layernorm.weight", COPY),
    ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", LINEAR),
    ("mlp/up_proj/kernel", "mlp.up_proj.weight", LINEAR),
    ("mlp/down_proj/kernel", "mlp.down_proj.weight", LINEAR),
]
TEXT_SELF = [(f"self_attn/{p}_proj/kernel", f"self_attn.{p}_proj.weight", LINEAR) for p in "qkv"] + [
    ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", LINEAR_HEADS_IN)]

# transformers' class defaults: save_pretrained may omit a field that equals them.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=2048, pad_token_id=None, bos_token_id=1, eos_token_id=2)


def text_rules(cfg: ModelConfig, hf: str, lm_head: str) -> list[Rule]:
    t = cfg.text
    out = [Rule("text/embed_tokens/embedding", f"{hf}.embed_tokens.weight", COPY),
           Rule("text/norm/scale", f"{hf}.norm.weight", COPY)]
    out += [Rule(f"text/decoder/layer_{i}/{o}", f"{hf}.layers.{i}.{h}", tr)
            for i in range(t.num_layers) for o, h, tr in TEXT_COMMON + TEXT_SELF]
    if not t.tie_word_embeddings:
        out.append(Rule("text/lm_head/kernel", lm_head, LINEAR))
    return out


def text_stacks(cfg: ModelConfig) -> list[Stack]:
    """Without cross-attention layers a scanned stack is one layer per step (`layer_0`)."""
    repeats, _, _ = layer_layout(cfg)
    return [Stack("text/decoder/layer_0/", repeats, lambda b: f"text/decoder/layer_{b}/")] if repeats > 1 else []


def rope_from_hf(tc: dict, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling fields or None) from the 5.x `rope_parameters` or the 4.x `rope_scaling`."""
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    theta = float(tc.get("rope_theta", rope.get("rope_theta", default_theta)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": rope_type, **{k: rope[k] for k in keys}}


def text_from_hf(tc: dict, where: str, defaults: dict = LLAMA_DEFAULTS) -> dict:
    """Our TextConfig fields from an HF Llama-style text_config; `defaults` are the HF class defaults."""
    if tc.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act '{tc['hidden_act']}' is not supported (Llama uses 'silu')")
    get = lambda key: tc.get(key, defaults[key])  # noqa: E731
    theta, scaling = rope_from_hf(tc, defaults["rope_theta"])
    eos, pad = get("eos_token_id"), get("pad_token_id")
    return {
        "vocab_size": get("vocab_size"),
        "hidden_size": get("hidden_size"),
        "intermediate_size": get("intermediate_size"),
        "num_layers": get("num_hidden_layers"),
        "num_heads": get("num_attention_heads"),
        "num_kv_heads": get("num_key_value_heads") or get("num_attention_heads"),
        "rms_norm_eps": get("rms_norm_eps"),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": get("max_position_embeddings"),
        "cross_attention_layers": [],
        "pad_token_id": -1 if pad is None else pad,
        "bos_token_id": get("bos_token_id"),
        "eos_token_id": eos if isinstance(eos, list) else [eos],
        "tie_word_embeddings": tc.get("tie_word_embeddings", False),
        "extra_embeddings": 0,
    }


def text_to_hf(t: TextConfig, dtype: str, model_type: str = "llama") -> dict:
    """The 4.x form (rope_scaling + rope_theta), readable by 4.x and 5.x."""
    eos = list(t.eos_token_id)
    return {
        "model_type": model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": None if t.rope_scaling is None else to_dict(t.rope_scaling),
        "max_position_embeddings": t.max_position_embeddings,
        "pad_token_id": t.pad_token_id if t.pad_token_id >= 0 else None,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": dtype,
    }


def generation_config(cfg: ModelConfig) -> dict:
    t = cfg.text
    eos = list(t.eos_token_id)
    return {"bos_token_id": t.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": t.pad_token_id if t.pad_token_id >= 0 else None}


def merge_config(base: dict | None, ours: dict) -> dict:
    """`ours` over the imported config.json, minus 5.x rope_parameters (superseded by our 4.x fields)."""
    out = deep_merge(base or {}, ours)
    out.get("text_config", {}).pop("rope_parameters", None)
    return out
