"""Adding a model family is one module plus one registry entry: this file alone registers a text-only Llama
(no images) and runs it through the real `vlm-jax train`, `plan` and `info`, with no edit to vlm_jax/."""
import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax import cli
from vlm_jax.config import check
from vlm_jax.config.model import validate_text
from vlm_jax.families import Family, register_family, synthetic_text
from vlm_jax.models.flops import decoder_groups
from vlm_jax.models.text import DecoderInputs, TextDecoder, packing_defaults

TOY = "toy_text_llama"


class TextOnlyLM(nn.Module):
    config: object
    decode: bool = False

    def setup(self):
        self.text = TextDecoder(self.config, decode=self.decode)

    def __call__(self, input_ids, segment_ids=None, positions=None, return_hidden: bool = False):
        input_ids = jnp.asarray(input_ids)
        segment_ids, positions = packing_defaults(input_ids, segment_ids, positions)
        return self.text(input_ids, DecoderInputs(positions, segment_ids, None, None, None),
                         return_hidden=return_hidden)


@register_family
class ToyTextLlama(Family):
    name = TOY
    sections = ("text",)
    model_inputs = ("input_ids", "segment_ids", "positions")

    def validate(self, m):
        validate_text(m)
        check(not m.text.cross_attention_layers, f"model.text.cross_attention_layers must be [] for '{TOY}'")

    def build(self, m, decode=False):
        return TextOnlyLM(m, decode=decode)

    def example_inputs(self, m, batch=1, seq_len=8, num_images=1):
        return dict(input_ids=jnp.zeros((batch, seq_len), jnp.int32))

    def flops_groups(self, m, batch, padded=False):
        return decoder_groups(m, *batch["input_ids"].shape)

    def synthetic_batch(self, m, data, batch_size, rng):
        return synthetic_text(m, data, batch_size, rng)


CONFIG = f"""
model:
  family: {TOY}
  dtype: float32
  param_dtype: float32
  image_token_index: 0
  text: {{vocab_size: 64, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2,
          cross_attention_layers: [], rope_theta: 10000.0, max_position_embeddings: 64, extra_embeddings: 0,
          pad_token_id: 0, bos_token_id: 1, eos_token_id: [2]}}
train:
  steps: 3
  batch_size: 8
  synthetic: {{enabled: true, seq_len: 16}}
  schedule: {{learning_rate: 3.0e-3, warmup_steps: 0}}
  log: {{every_steps: 1, tensorboard: false}}
  checkpoint: {{every_steps: 3}}
"""


def test_a_family_registered_outside_vlm_jax_trains_plans_and_reports(tmp_path, capsys):
    config = tmp_path / "toy.yaml"
    config.write_text(CONFIG)
    workdir = tmp_path / "run"

    assert cli.main(["train", "--config", str(config), f"workdir={workdir}"]) == 0
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]

    capsys.readouterr()
    assert cli.main(["info", "--config", str(config)]) == 0
    counts = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines())
    t = 32 // 4  # head_dim
    layer = 2 * 32 + 32 * 4 * t * 2 + 32 * 2 * t * 2 + 3 * 32 * 64
    expected = 64 * 32 + 2 * layer + 32 + 32 * 64  # embeddings, layers, final norm, lm_head
    assert int(counts["total"].replace(",", "")) == int(counts["text"].replace(",", "")) == expected

    assert cli.main(["plan", "--config", str(config), "--topology", "v5p-8"]) == 0
    out = capsys.readouterr().out
    assert "stage 'train'" in out and "fits" in out


def test_an_unknown_family_is_one_line_naming_the_registered_ones(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace(f"family: {TOY}", "family: nope"))
    assert cli.main(["info", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.family: unknown model family 'nope'" in err
    assert all(name in err for name in ("mllama", "llava", "idefics3", "clip", "siglip", TOY))
