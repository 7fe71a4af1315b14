"""Questions about images -> answers: records through the data pipeline's preparer, left-padded prompt
batches, jitted generation, decoded text. One `Answerer` serves `vlm-jax generate`, `vlm-jax eval`, the
demo and the trainer's periodic accuracy evaluation.
"""
from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.config import DataConfig, MeshConfig
from vlm_jax.data import ExamplePreparer, collate, get_template, load_tokenizer
from vlm_jax.data.tokenizer import TOKENIZER_FILE, check_tokenizer_fits
from vlm_jax.errors import UserError
from vlm_jax.families import generating_family
from vlm_jax.infer.generate import Sampling, generate
from vlm_jax.paths import user_path
from vlm_jax.train import checkpoint

_LENGTH_BUCKET = 16  # prompt widths are rounded up to this, so a held-out set compiles once or twice


def left_align(batch: dict, lengths: np.ndarray, image_inputs: tuple[str, ...]) -> dict:
    """Right-padded collated rows -> the inputs of `generate`: prompts left-padded (`prompt_mask` 1 on real
    tokens), so every row's next token goes to the same position, with their images (`image_inputs`, per image
    slot: not moved) and cross-attention mask. Training-only arrays (loss_mask, packing ids) are dropped."""
    width = batch["input_ids"].shape[1]
    out = {k: batch[k] for k in image_inputs if k in batch}
    out["input_ids"] = np.stack([np.roll(row, width - n) for row, n in zip(batch["input_ids"], lengths)])
    out["prompt_mask"] = (np.arange(width)[None, :] >= (width - lengths)[:, None]).astype(np.int32)
    if "cross_attention_mask" in batch:
        out["cross_attention_mask"] = np.stack([np.roll(row, width - n, axis=0)
                                                for row, n in zip(batch["cross_attention_mask"], lengths)])
    return out


class Answerer:
    """Greedy (or sampled) answers of a generating family's model to {"images", "turns"} records."""

    def __init__(self, model, params, tokenizer, data: DataConfig, batch_size: int = 32, max_new_tokens: int = 8,
                 sampling: Sampling | None = None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.family = generating_family(model.config, "answering questions")
        self.spec = self.family.input_spec(model.config)
        self.template = get_template(data.template, tokenizer)
        self.data, self.batch_size = data, batch_size
        self.preparer = ExamplePreparer(self.spec, self.template, data.image, data.shapes)
        base = sampling or Sampling()
        self.sampling = dataclasses.replace(base, max_new_tokens=max_new_tokens, pad_token=self.template.pad_id,
                                            stop_tokens=base.stop_tokens or self.template.stop_ids)

    def prompts(self, records: list[dict]) -> tuple[dict, list[str]]:
        """(left-padded prompt batch padded to `batch_size` rows by repeating the last, reference answers)."""
        prepared = [self.preparer.prompt(r) for r in records]
        examples = [e for e, _ in prepared] + [prepared[-1][0]] * (self.batch_size - len(prepared))
        lengths = np.array([len(e["tokens"]) for e in examples])
        width = -(-int(lengths.max()) // _LENGTH_BUCKET) * _LENGTH_BUCKET
        slots = max(1, max(e["num_slots"] for e in examples))
        shapes = dataclasses.replace(self.data.shapes, seq_len=width, max_images=slots)
        batch = collate([[e] for e in examples], self.spec, shapes, self.template.pad_id)
        return left_align(batch, lengths, self.family.generation_inputs), [a for _, a in prepared]

    def decode(self, new_tokens: np.ndarray) -> list[str]:
        """Generated ids -> text, cut at the first stop token."""
        answers = []
        for row in np.asarray(new_tokens):
            stops = np.flatnonzero(np.isin(row, self.sampling.stop_tokens))
            answers.append(self.tokenizer.decode(row[:stops[0] if len(stops) else len(row)].tolist()).strip())
        return answers

    def generate_tokens(self, records: list[dict], rng=None, backend=None) -> tuple[np.ndarray, list[str]]:
        """(new token ids (len(records), max_new_tokens), reference answers), in batches of `batch_size`.
        `backend(prompts) -> ids` replaces the JAX generation, e.g. transformers' (`hf_reference.hf_generate`)."""
        key = jax.random.PRNGKey(0) if rng is None else rng

        def jax_backend(prompts, start):
            # Each batch draws its own noise: with one key, rows at the same place of different batches would share it.
            return generate(self.model, self.params, prompts, self.sampling, jax.random.fold_in(key, start))

        tokens, references = [], []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            prompts, refs = self.prompts(chunk)
            tokens.append(np.asarray(backend(prompts) if backend else jax_backend(prompts, start))[:len(chunk)])
            references += refs
        return np.concatenate(tokens), references

    def with_params(self, params) -> Answerer:
        """The same answerer over other parameters of its model (placed alike: its compiled code is reused)."""
        other = copy.copy(self)
        other.params = params
        return other

    def answer(self, records: list[dict], rng=None) -> list[str]:
        return self.decode(self.generate_tokens(records, rng)[0])


def tokenizer_path(config, checkpoint_path: str, explicit: str = "") -> tuple[str | None, list[str]]:
    """(the tokenizer a checkpoint was trained with, or None; the places looked at): `explicit`, else the
    config's data.tokenizer, else the one training kept in the run's workdir (the run's recorded workdir, or
    the folder holding the checkpoints/ directory)."""
    candidates = [explicit] if explicit else [config.data.tokenizer] if config.data.tokenizer else [
        str(user_path(config.workdir, "workdir") / TOKENIZER_FILE) if config.workdir else "",
        str(_workdir_of(checkpoint_path) / TOKENIZER_FILE)]
    candidates = [c for c in candidates if c]
    return next((c for c in candidates if user_path(c, "tokenizer").exists()), None), candidates


def find_tokenizer(config, checkpoint_path: str, explicit: str = ""):
    path, looked_at = tokenizer_path(config, checkpoint_path, explicit)
    if path is None:
        raise UserError(f"no tokenizer found for {checkpoint_path} (looked at {', '.join(looked_at)}); "
                        "pass --tokenizer PATH")
    return load_tokenizer(path)


def _workdir_of(checkpoint_path: str):
    """workdir/checkpoints[/step] -> workdir."""
    path = user_path(checkpoint_path, "--checkpoint")
    if path.name.isdigit():
        path = path.parent
    return path.parent if path.name == "checkpoints" else path


def restore_sharded(checkpoint_path: str):
    """A checkpoint's params sharded over every device (the default mesh and rules), so a model larger than one
    device's memory loads."""
    mesh_config = MeshConfig()
    return checkpoint.restore_params(checkpoint_path, mesh=sharding.make_mesh(mesh_config),
                                     rules=sharding.load_rules(mesh_config.rules))


def restore_model(checkpoint_path: str, tokenizer: str, family_for, restore: bool = True) -> tuple:
    """(config, model, params, tokenizer) of a checkpoint written by `vlm-jax train` or `vlm-jax import`;
    `family_for(model config)` returns the family, or raises when the checkpoint does not serve the caller. With
    `restore` False no params are read (None)."""
    config, _, _ = checkpoint.read_meta(checkpoint_path)
    model = family_for(config.model).build(config.model)
    tokenizer = find_tokenizer(config, checkpoint_path, tokenizer)  # before the (slow) restore: mistakes first
    check_tokenizer_fits(tokenizer, config.model, f"{tokenizer} (for {checkpoint_path})")
    return config, model, restore_sharded(checkpoint_path) if restore else None, tokenizer


def load_answerer(checkpoint_path: str, tokenizer: str = "", data: DataConfig | None = None, restore: bool = True,
                  **kwargs) -> Answerer:
    """An Answerer for a checkpoint written by `vlm-jax train` or `vlm-jax import`; the data settings (template,
    image op, shapes) are the run's own unless `data` is given. With `restore` False no params are read: give
    them (e.g. a model soup's candidates) with `with_params`."""
    config, model, params, tokenizer = restore_model(
        checkpoint_path, tokenizer, lambda m: generating_family(m, f"generating from {checkpoint_path}"), restore)
    return Answerer(model, params, tokenizer, data or config.data, **kwargs)
