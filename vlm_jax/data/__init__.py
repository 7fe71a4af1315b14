"""Grain input pipeline: sources, image ops (tiling), tokenizers, templates, packing, batches.

Training loop:  it = build_pipeline(cfg.data, load_tokenizer(cfg.data.tokenizer), family.input_spec(cfg.model),
                                    jax.process_index(), jax.process_count())
                batch = next(it); state = it.get_state()   # JSON; restore_state() re-shards it
"""
from vlm_jax.config.data import (DataConfig, ImageConfig, PackingConfig, ShapeConfig, SourceConfig, WorkerConfig,
                                 validate_data)
from vlm_jax.data.bad_records import REASONS, BadRecord, TooManyBadRecords
from vlm_jax.data.batching import collate
from vlm_jax.data.cross_attention import cross_attention_mask, image_token_spans
from vlm_jax.data.examples import ExamplePreparer
from vlm_jax.data.image_ops import get_image_op, register_image_op
from vlm_jax.data.images import BadImage, decode_image
from vlm_jax.data.pipeline import build_pipeline
from vlm_jax.data.sources import build_source, register_source
from vlm_jax.data.sources.embedded import EmbeddedSource, EmbeddedTask, get_task, list_tasks, task_texts
from vlm_jax.data.sources.tfds_source import build_tfds_dataset
from vlm_jax.data.spec import InputSpec, check_image_tokens
from vlm_jax.data.state import reshard_states, restore_state
from vlm_jax.data.templates import Template, expand_image_tokens, get_template, register_template
from vlm_jax.data.tiling import Tiles, catty_tile, mllama_tile
from vlm_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece
