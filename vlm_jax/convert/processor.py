"""The processor half of a Hugging Face export: the tokenizer (ours converted to tokenizer.json, or the files an
imported checkpoint came with), the chat template the model was trained with, and the image processor settings,
so `AutoProcessor.from_pretrained(export)` prepares exactly the inputs training did. Token ids written to
config.json and generation_config.json are the tokenizer's (`with_tokenizer_ids`)."""
from __future__ import annotations

import dataclasses
import json

from vlm_jax.config import DataConfig, ModelConfig
from vlm_jax.convert import family_module, to_hf
from vlm_jax.data import get_template
from vlm_jax.data.templates import Template
from vlm_jax.data.tokenizer import BOS, EOS, Tokenizer
from vlm_jax.errors import ConversionError
from vlm_jax.families import build_model, get_family
from vlm_jax.paths import user_path, write_atomic

# What an HF checkpoint keeps beside its weights for its processor; `vlm-jax import` keeps them with the
# checkpoint (in PROCESSOR_DIR) and `vlm-jax export` copies them back.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json")
PROCESSOR_DIR = "hf_processor"


def copy_processor_files(src_dir, out_dir) -> list[str]:
    """Copies the processor files of `src_dir` (an HF directory, or the ones `import` kept) into `out_dir`;
    returns their names."""
    src, out = user_path(src_dir, "--hf"), user_path(out_dir, "--out")
    names = [n for n in PROCESSOR_FILES if (src / n).is_file()]
    for name in names:
        write_atomic(out / name, (src / name).read_bytes())
    return names


def keep_processor_files(hf_dir, checkpoint_dir) -> list[str]:
    """`import`: the HF directory's processor files, kept in `checkpoint_dir`/PROCESSOR_DIR for `export`."""
    return copy_processor_files(hf_dir, user_path(checkpoint_dir, "--out") / PROCESSOR_DIR)


def kept_processor_dir(checkpoint_dir):
    """The processor files `import` kept with a checkpoint (looked for in it and the folders above, up to the
    one holding checkpoints/), or None."""
    path = user_path(checkpoint_dir, "--checkpoint")
    for _ in range(3):
        if (path / PROCESSOR_DIR).is_dir():
            return path / PROCESSOR_DIR
        path = path.parent
    return None


def with_tokenizer_ids(model: ModelConfig, tokenizer: Tokenizer, template: Template
                       ) -> tuple[ModelConfig, list[str]]:
    """(`model` with the tokenizer's bos, pad and image ids, and as eos ids every id that ends an answer: the
    template's stop ids, then the config's other eos ids unless they name bos/pad/image; the changes made, one
    'field: old -> new' line each)."""
    t = model.text
    taken = {tokenizer.bos_id, tokenizer.pad_id, tokenizer.image_id}
    eos = tuple(dict.fromkeys([*template.stop_ids, *(i for i in t.eos_token_id if i not in taken)]))
    text = dataclasses.replace(t, bos_token_id=tokenizer.bos_id, eos_token_id=eos, pad_token_id=tokenizer.pad_id)
    out = dataclasses.replace(model, text=text, image_token_index=tokenizer.image_id)
    pairs = [(f"model.text.{f}", getattr(t, f), getattr(text, f)) for f in ("bos_token_id", "eos_token_id",
                                                                             "pad_token_id")]
    pairs.append(("model.image_token_index", model.image_token_index, out.image_token_index))
    return out, [f"{name}: {old} -> {new}" for name, old, new in pairs if old != new]


def has_processor(model: ModelConfig) -> bool:
    """Whether the family's conversion module describes its HF processor (`hf_processor`)."""
    return hasattr(family_module(model), "hf_processor")


def export_repo(model: ModelConfig, data: DataConfig, params, out_dir: str, tokenizer: Tokenizer,
                dtype: str = "float32", hf_config_base: dict | None = None,
                vision_layer_convention: str | None = None, max_shard_bytes: int = 5 << 30
                ) -> tuple[list[str], list[str]]:
    """A complete HF model repo in `out_dir`: weights, config.json and generation_config.json with the tokenizer's
    ids, and the processor (`write_processor`). Returns the config ids the tokenizer replaced (`with_tokenizer_ids`)
    and `to_hf`'s notes. The family must have a processor (`has_processor`)."""
    model, changes = with_tokenizer_ids(model, tokenizer, get_template(data.template, tokenizer))
    notes = to_hf(build_model(model), params, out_dir, dtype=dtype, hf_config_base=hf_config_base,
                  max_shard_bytes=max_shard_bytes, vision_layer_convention=vision_layer_convention)
    write_processor(out_dir, model, data, tokenizer)
    return changes, notes


def write_processor(out_dir: str, model: ModelConfig, data: DataConfig, tokenizer: Tokenizer):
    """Writes tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json,
    chat_template.json, preprocessor_config.json and processor_config.json into `out_dir`, in the layout
    transformers 4.x writes (5.x reads it too)."""
    family = get_family(model)
    module = family_module(model)
    if not hasattr(module, "hf_processor"):
        raise ConversionError(f"model.family '{family.name}' has no Hugging Face processor; export the weights "
                              "alone or add hf_processor to its conversion module")
    processor_class, (image_class, image_settings), extra = module.hf_processor(model, family.input_spec(model),
                                                                                data.image)
    template = get_template(data.template, tokenizer)
    chat_template = template.chat_template()
    image = tokenizer.id_to_token(tokenizer.image_id)
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": tokenizer.id_to_token(tokenizer.pad_id)}
    out = user_path(out_dir, "--out")
    write_atomic(out / "tokenizer.json", tokenizer.to_tokenizers().to_str())
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "image_token": image,
            "extra_special_tokens": {"image_token": image}, "chat_template": chat_template,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": model.text.max_position_embeddings, "processor_class": processor_class},
        "special_tokens_map.json": specials,
        "chat_template.json": {"chat_template": chat_template},
        "preprocessor_config.json": {"image_processor_type": image_class, "processor_class": processor_class,
                                     **image_settings},
        "processor_config.json": {"processor_class": processor_class, **extra},
    }
    for name, content in files.items():
        write_atomic(out / name, json.dumps(content, indent=2))
