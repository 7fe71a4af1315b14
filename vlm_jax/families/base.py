"""The family object: everything that differs between model families, asked by every layer above.

A family is one module that subclasses `Family` and registers it (`@register_family`). The trainer, `plan`,
`eval`, `generate`, `info` and `import`/`export` ask it for what they need (its model, its inputs, its
objective, its data, its FLOPs, its HF conversion) and never branch on its name.
"""
from __future__ import annotations

import flax.linen as nn
import numpy as np

from vlm_jax.config import ModelConfig, SyntheticDataConfig
from vlm_jax.data.spec import InputSpec
from vlm_jax.errors import ConfigError
from vlm_jax.models.flops import Group
from vlm_jax.registry import FAMILIES

FIRST_WORD_ID = 3  # synthetic text: ids below are reserved (pad/bos/eos in the tiny vocabularies)


class Family:
    name: str = ""
    # The ModelConfig sections the family reads (documentation and `info`; the rest keep their defaults).
    sections: tuple[str, ...] = ()
    objective: str = "next_token"  # a registered objective (vlm_jax/objectives/)
    train_data: str = "pipeline"  # the training-data kind that reads data.sources for it (vlm_jax/train/data/)
    hf_conversion: str = ""  # the module converting it from/to Hugging Face (vlm_jax/convert/); "" = none
    hf_model_types: tuple[str, ...] = ()  # HF config.json model_type values it imports
    model_inputs: tuple[str, ...] = ()  # batch keys its model takes as keyword arguments
    generation_inputs: tuple[str, ...] | None = None  # image inputs `generate` passes; None = cannot generate

    def validate(self, m: ModelConfig):
        """Raises a one-line ConfigError for the first problem in the sections it reads."""

    def build(self, m: ModelConfig, decode: bool = False) -> nn.Module:
        raise NotImplementedError

    def example_inputs(self, m: ModelConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict:
        """Smallest inputs that touch every parameter: used for init and abstract shapes."""
        raise NotImplementedError

    def flops_groups(self, m: ModelConfig, batch: dict, padded: bool = False) -> list[Group]:
        """Forward FLOPs of `batch` (host arrays or shapes; all its rows) per parameter group, in data-flow order
        (vlm_jax/models/flops.py). Images and tiles are billed where the batch's masks say one is present; with
        `padded`, every slot and tile of its shapes (what the compiled step computes)."""
        raise NotImplementedError

    def input_spec(self, m: ModelConfig) -> InputSpec:
        """What the Grain pipeline must produce for this model."""
        raise ConfigError(f"model.family '{self.name}' is not fed by the Grain pipeline (its training data is "
                          f"'{self.train_data}'); it has no input spec")

    def synthetic_batch(self, m: ModelConfig, data: SyntheticDataConfig, batch_size: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One host batch of generated data of the model's input structure (train.synthetic.enabled)."""
        raise ConfigError(f"model.family '{self.name}' has no synthetic batches; set data.sources "
                          "(e.g. [{kind: embedded, name: digits_qa}])")

    def model_kwargs(self, batch: dict) -> dict:
        """The entries of `batch` its model takes as keyword arguments (the rest feed the objective)."""
        return {k: batch[k] for k in self.model_inputs if k in batch}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: registers one instance of `cls` under `cls.name`."""
    FAMILIES.register(cls.name)(cls())
    return cls


def synthetic_text(m: ModelConfig, data: SyntheticDataConfig, batch_size: int, rng: np.random.Generator,
                   image_slot: int | None = None) -> dict[str, np.ndarray]:
    """Rows that are arithmetic progressions of tokens (learnable) after BOS, the second half supervised; with
    `image_slot`, that position holds the image token."""
    t, b, s = m.text, batch_size, data.seq_len
    span = t.vocab_size - FIRST_WORD_ID
    start = rng.integers(0, span, size=(b, 1))
    stride = rng.integers(1, 4, size=(b, 1))
    ids = FIRST_WORD_ID + (start + stride * np.arange(s)) % span
    ids[ids == m.image_token_index] = FIRST_WORD_ID  # an image token inside the vocabulary is not text
    ids[:, 0] = t.bos_token_id
    if image_slot is not None:
        ids[:, image_slot] = m.image_token_index
    loss_mask = np.zeros((b, s), np.float32)
    loss_mask[:, s // 2:] = 1.0
    return dict(input_ids=ids.astype(np.int32), loss_mask=loss_mask)
