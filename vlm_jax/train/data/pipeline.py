"""The Grain pipeline as training data (data.sources of a generative family): the tokenizer, each stage's
data config, iterators, example batches and the `data_iter` checkpoint item.

The saved item is {"kind": "grain", "process_states": [state of process 0, 1, ...]} (gathered from all
processes at each save), so a checkpoint resumes on any process count: the same count picks its own state,
another count re-shards all of them with `reshard_states` (deterministic: every process computes the same).
"""
from __future__ import annotations

import json

import numpy as np
from jax.experimental import multihost_utils

from vlm_jax.data import build_pipeline, collate, load_tokenizer, reshard_states, task_texts, train_sentencepiece
from vlm_jax.data.sources.embedded import EMBEDDED_KINDS
from vlm_jax.data.tokenizer import TOKENIZER_FILE, check_tokenizer_fits
from vlm_jax.errors import ConfigError
from vlm_jax.families import generating_family
from vlm_jax.objectives import REFERENCE_LOGPS, get_objective, is_paired, needs_reference
from vlm_jax.paths import user_path
from vlm_jax.registry import TRAIN_DATA
from vlm_jax.train.data.base import StagedSourcesData
from vlm_jax.train.recipe import stage_train_config


@TRAIN_DATA.register("pipeline")
class PipelineData(StagedSourcesData):
    reads_pairs = True

    def __init__(self, cfg, stages, family, echo=print, hosts: int | None = None):
        super().__init__(cfg, stages, family, echo, hosts)
        # Stages whose objective reads preference pairs, and those that also read the reference's log-probs column.
        objectives = {s.index: get_objective(cfg.model, stage_train_config(cfg.train, s)) for s in stages}
        self.pairs = {i: is_paired(o) for i, o in objectives.items()}
        self.references = {i: needs_reference(o) for i, o in objectives.items()}
        self.spec = family.input_spec(cfg.model)
        model = cfg.model
        self.pad_id = model.text.pad_token_id  # a plan's example batch: what padding holds does not change the step
        self._check_microbatches()
        if not self.reads:
            return
        self.tokenizer, where = self._tokenizer()
        self.pad_id = self.tokenizer.pad_id
        check_tokenizer_fits(self.tokenizer, model, where)
        self._check_token_ids(model, where)
        if self.tokenizer.vocab_size > model.text.vocab_size:
            raise ConfigError(f"the tokenizer {where} has {self.tokenizer.vocab_size} tokens, more than "
                              f"model.text.vocab_size ({model.text.vocab_size}); use a smaller tokenizer or model")
        if cfg.train.eval_examples:
            generating_family(cfg.model, "train.eval_examples (greedy-answer accuracy; 0 turns it off)")

    def _check_microbatches(self):
        micro = self.cfg.train.microbatches
        for index, data in self.configs.items():
            rows = self.global_batch(index)
            units, what = (rows // 2, "pairs") if self.pairs[index] else (rows, "rows")
            if units % micro:
                raise ConfigError(f"train.microbatches ({micro}) must divide the global batch of {units} {what} "
                                  f"(data.shapes.batch_size {data.shapes.batch_size} x {self.process_count} processes)")

    def _check_token_ids(self, model, where: str):
        """The config's special ids are the tokenizer's: export writes them, and HF `generate` stops on them."""
        tok, t = self.tokenizer, model.text
        for field, ours, theirs in (("bos_token_id", t.bos_token_id, tok.bos_id),
                                    ("pad_token_id", t.pad_token_id, tok.pad_id)):
            if ours != theirs:
                raise ConfigError(f"model.text.{field} ({ours}) must equal the tokenizer's ({theirs}, {where}); "
                                  f"set model.text.{field}={theirs}")
        if tok.eos_id not in t.eos_token_id:
            raise ConfigError(f"model.text.eos_token_id ({list(t.eos_token_id)}) must contain the tokenizer's eos id "
                              f"({tok.eos_id}, {where}); set model.text.eos_token_id=[{tok.eos_id}]")

    def _tokenizer(self):
        if self.cfg.data.tokenizer:
            try:
                return load_tokenizer(self.cfg.data.tokenizer), f"data.tokenizer={self.cfg.data.tokenizer}"
            except ValueError as e:
                raise ConfigError(f"data.tokenizer: {e}") from None
        # A sample stage's records are this run's answers to embedded prompts: the tokenizer covers them too.
        kinds = {s.kind for d in self.configs.values() for s in d.sources + d.eval_sources if not s.stage}
        if not kinds <= set(EMBEDDED_KINDS):
            raise ConfigError("data.tokenizer is empty; set it to a sentencepiece .model or an HF tokenizer.json "
                              "(one is trained automatically only when every source is an embedded task)")
        path = user_path(self.cfg.workdir, "workdir") / TOKENIZER_FILE
        if path.is_file():
            return load_tokenizer(path), str(path)
        # Deterministic (one training thread), so every process trains the same one; process 0 keeps it.
        tokenizer = train_sentencepiece(task_texts(), vocab_size=self.cfg.model.text.vocab_size)
        if self.process_index == 0:
            tokenizer.save(path)  # through a temporary name
            self.echo(f"trained a {tokenizer.vocab_size}-token sentencepiece tokenizer on the embedded tasks: {path}")
        return tokenizer, str(path)

    def example_batch(self, stage: int) -> dict[str, np.ndarray]:
        shapes = self.configs[stage].shapes
        batch = collate([[] for _ in range(shapes.batch_size)], self.spec, shapes, self.pad_id)
        if self.references[stage]:
            batch[REFERENCE_LOGPS] = np.zeros(shapes.batch_size, np.float32)
        return batch

    def iterator(self, stage: int, saved: dict):
        state = self.continued_state(stage, saved)
        return build_pipeline(self.configs[stage], self.tokenizer, self.spec, self.process_index,
                              self.process_count, train=True, state=None if state is None else self.own_state(state),
                              pairs=self.pairs[stage])

    def own_state(self, saved: dict) -> dict:
        if saved.get("kind") != "grain":
            raise ConfigError(f"the checkpoint's data iterator is '{saved.get('kind')}', not the Grain pipeline "
                              "(data.sources changed since it was written); use a new workdir")
        states = saved["process_states"]
        if len(states) == self.process_count and all(s["process_count"] == self.process_count for s in states):
            return states[self.process_index]
        self.echo(f"re-sharding the data iterator from {len(states)} to {self.process_count} processes")
        return reshard_states(states, self.process_count)[self.process_index]

    def state(self, iterator) -> dict:
        own = iterator.get_state()
        if self.process_count == 1:
            return {"kind": "grain", "process_states": [own]}
        raw = np.frombuffer(json.dumps(own).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[:raw.size] = raw
        gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(self.process_count, -1)
        return {"kind": "grain", "process_states": [json.loads(bytes(gathered[p, :sizes[p]]).decode())
                                                    for p in range(self.process_count)]}

    def eval_batches(self, stage: int, limit: int):
        iterator = build_pipeline(self.configs[stage], self.tokenizer, self.spec, self.process_index,
                                  self.process_count, train=False, pairs=self.pairs[stage])
        try:
            for i, batch in enumerate(iterator):
                if limit and i >= limit:
                    break
                yield batch
        finally:
            iterator.close()
