"""Contrastive (CLIP / SigLIP) pre-training data from the embedded tasks, for the same Trainer as the LMs.

An embedded record (image, answer) becomes an (image, caption) pair: a per-task template turns the answer into
an informative caption ("a handwritten seven", "a red shape"). Captions are a closed set (templates over each
task's closed answer set), so the tokenizer is word-level and fixed by the tasks named in the config: word ids
fill the text tower's vocabulary in order, skipping its bos/eos/pad ids. A CLIP text is [bos] words [eos] pad...
(CLIP pools at the first eos), a SigLIP text words [eos] pad... (pooled at the last position); attention_mask
marks the real tokens.

Batches are a pure function of (data.seed, row position): row p of the stream is element p mod N of the
permutation (data.seed, epoch p div N) of the concatenated training splits (N examples). The checkpointed
state is that position, so a resumed run sees exactly the rows the uninterrupted one would. One global batch is
data.shapes.batch_size rows from each process (process i takes its own slice of the same global rows).

Held-out evaluation (data.eval_sources): the contrastive loss over consecutive full global batches, and
image->text retrieval over the DISTINCT captions of the held-out set: each image's positive is its own caption
string, the candidates are the unique captions (many images share a caption, so retrieval among N pair copies
would be ill-posed). Chance is min(k, U) / U for U unique captions; it is logged next to recall@k.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax.data.image_ops import get_image_op
from vlm_jax.data.sources.embedded import DIGIT_WORDS, EmbeddedSource, get_task
from vlm_jax.data.spec import TOWER_NORMALIZATION
from vlm_jax.errors import ConfigError
from vlm_jax.models.contrastive import sigmoid_style
from vlm_jax.registry import TRAIN_DATA
from vlm_jax.train.data.base import SeededStream, StagedSourcesData

CAPTIONS = {
    "digits_qa": lambda a: f"a handwritten {DIGIT_WORDS[int(a)]}",
    "digits_caption": lambda a: f"a handwritten {a}",
    "shapes_color": lambda a: f"a {a} shape",
    "shapes_kind": lambda a: f"a {a}",
    "shapes_count": lambda a: f"{a} shapes",
    "shapes_position": lambda a: f"a shape at the {a}",
    "ocr_word": lambda a: f"the word {a}",
    "chart_tallest": lambda a: f"a bar chart whose tallest bar is {a}",
    "chart_count": lambda a: f"a bar chart with {a} bars",
}
KS = (1, 5, 10)


def caption(task: str, answer: str) -> str:
    return CAPTIONS[task](answer)


class WordTokenizer:
    """Word-level ids for a closed set of captions, laid out for the model's text tower."""

    def __init__(self, captions, model):
        e = model.text_encoder
        self.words = sorted({w for c in captions for w in c.split()})
        specials = {e.bos_token_id, e.eos_token_id, e.pad_token_id}
        free = [i for i in range(e.vocab_size) if i not in specials]
        if len(self.words) > len(free):
            raise ConfigError(f"the captions use {len(self.words)} words, more than the {len(free)} free ids of "
                              f"model.text_encoder.vocab_size ({e.vocab_size}); raise it or use fewer tasks")
        self.ids = dict(zip(self.words, free))
        self.bos = None if sigmoid_style(model) else e.bos_token_id
        self.eos, self.pad = e.eos_token_id, e.pad_token_id

    def encode(self, text: str) -> list[int]:
        return ([self.bos] if self.bos is not None else []) + [self.ids[w] for w in text.split()] + [self.eos]

    def batch(self, texts, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), seq_len), self.pad, np.int32)
        mask = np.zeros((len(texts), seq_len), np.int32)
        for i, text in enumerate(texts):
            row = self.encode(text)
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask


class PairReader:
    """(image, caption) pairs of several embedded splits, concatenated; images resized to the tower's input."""

    def __init__(self, sources, model):
        self.sources = [EmbeddedSource(s.name, s.split, s.size) for s in sources]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        mean, std = TOWER_NORMALIZATION[model.vit.kind]
        self.image_op = get_image_op("resize", image_size=model.vit.image_size, mean=mean, std=std)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, flat: int) -> tuple[np.ndarray, str]:
        k = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        source = self.sources[k]
        record = source[int(flat - self.offsets[k])]
        pixels = self.image_op(record["images"][0]).pixels[0]  # (C, H, W) float32
        return pixels, caption(source.task.name, record["turns"][-1][1])

    def batch(self, flats, tokenizer: WordTokenizer, seq_len: int) -> dict[str, np.ndarray]:
        pairs = [self[int(i)] for i in flats]
        ids, mask = tokenizer.batch([c for _, c in pairs], seq_len)
        return dict(pixel_values=np.stack([p for p, _ in pairs]).astype(np.float32), input_ids=ids,
                    attention_mask=mask)


class ContrastiveSource(SeededStream):
    """The resumable training stream (see the module docstring)."""
    kind = "contrastive"

    def __init__(self, reader: PairReader, tokenizer: WordTokenizer, seq_len: int, rows: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.reader, self.tokenizer, self.seq_len, self.rows, self.seed = reader, tokenizer, seq_len, rows, seed
        self.process_index, self.process_count = process_index, process_count
        self.position, self._perm = 0, (None, None)

    def _flat(self, position: int) -> int:
        epoch, k = divmod(position, len(self.reader))
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.reader)))
        return int(self._perm[1][k])

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.position + self.process_index * self.rows
        flats = [self._flat(p) for p in range(start, start + self.rows)]
        self.position += self.rows * self.process_count
        return self.reader.batch(flats, self.tokenizer, self.seq_len)


@TRAIN_DATA.register("contrastive")
class ContrastiveData(StagedSourcesData):
    """(image, caption) pairs of embedded tasks for a dual encoder: per-stage data configs, the training stream,
    the example batch the step compiles for, held-out loss batches and retrieval metrics."""

    def __init__(self, cfg, stages, family, echo=print, hosts: int | None = None):
        if cfg.model.vit is None or cfg.model.text_encoder is None:
            raise ConfigError(f"contrastive training data is for a dual encoder (model.vit and model.text_encoder); "
                              f"model.family '{cfg.model.family}' is not one")
        super().__init__(cfg, stages, family, echo, hosts)
        self.model_cfg = cfg.model
        if cfg.train.microbatches != 1:
            raise ConfigError(f"train.microbatches={cfg.train.microbatches}: contrastive losses take their negatives "
                              "from the whole global batch, which microbatches would split; set train.microbatches=1")
        e, captions = cfg.model.text_encoder, []
        for index, data in self.configs.items():
            where = "data" if index == 0 else f"train.stages[{index}].data"
            for i, s in enumerate(data.sources + data.eval_sources):
                if s.kind != "embedded" or s.name not in CAPTIONS:
                    raise ConfigError(f"{where}: source {s.kind}/{s.name} has no caption template; contrastive "
                                      f"training reads the embedded tasks {sorted(CAPTIONS)}")
                if s.weight != 1.0 and i < len(data.sources):
                    raise ConfigError(f"{where}.sources[{i}].weight={s.weight}: the contrastive stream mixes tasks "
                                      "by split size; set weight 1 (and size for procedural tasks) instead")
                captions += [caption(s.name, a) for a in get_task(s.name).answers]
            if data.shapes.seq_len > e.max_position_embeddings:
                raise ConfigError(f"{where}.shapes.seq_len ({data.shapes.seq_len}) exceeds "
                                  f"model.text_encoder.max_position_embeddings ({e.max_position_embeddings})")
        self.tokenizer = WordTokenizer(captions, cfg.model)
        longest = max(len(self.tokenizer.encode(c)) for c in captions)
        for index, data in self.configs.items():
            if data.shapes.seq_len < longest:
                raise ConfigError(f"data.shapes.seq_len ({data.shapes.seq_len}) is shorter than the longest caption "
                                  f"({longest} tokens with bos/eos); raise it to at least {longest}")
        self._eval_cache = {}

    def example_batch(self, stage_index: int) -> dict[str, np.ndarray]:
        """Zeros of the stage's host batch shapes (what the step compiles for)."""
        shapes, v = self.configs[stage_index].shapes, self.model_cfg.vit
        b, s = shapes.batch_size, shapes.seq_len
        return dict(pixel_values=np.zeros((b, v.num_channels, v.image_size, v.image_size), np.float32),
                    input_ids=np.zeros((b, s), np.int32), attention_mask=np.zeros((b, s), np.int32))

    def iterator(self, stage_index: int, saved: dict) -> ContrastiveSource:
        """The state is the same on every process: a pure function of the global position."""
        data = self.configs[stage_index]
        source = ContrastiveSource(PairReader(data.sources, self.model_cfg), self.tokenizer, data.shapes.seq_len,
                                   data.shapes.batch_size, data.seed, self.process_index, self.process_count)
        state = self.continued_state(stage_index, saved)
        if state is not None:
            source.set_state(state)
        return source

    def _held_out(self, stage_index: int):
        """(reader, global batch rows) of the stage's held-out pairs."""
        data = self.configs[stage_index]
        key = data.eval_sources
        if key not in self._eval_cache:
            self._eval_cache[key] = PairReader(data.eval_sources, self.model_cfg)
        return self._eval_cache[key], self.global_batch(stage_index)

    def _held_out_captions(self, reader: PairReader) -> list[str]:
        if not hasattr(reader, "captions"):  # the reader is cached per eval_sources, so this runs once
            reader.captions = [reader[i][1] for i in range(len(reader))]
        return reader.captions

    def eval_batches(self, stage_index: int, limit: int):
        """Consecutive full global batches of the held-out pairs, in order (this process's rows), at most
        `limit` (0 = all full batches; a remainder smaller than a batch is left out of the loss)."""
        reader, rows = self._held_out(stage_index)
        local, seq_len = self.configs[stage_index].shapes.batch_size, self.configs[stage_index].shapes.seq_len
        count = len(reader) // rows
        for b in range(min(count, limit) if limit else count):
            start = b * rows + self.process_index * local
            yield reader.batch(range(start, start + local), self.tokenizer, seq_len)

    def eval_metrics(self, model, params, stage_index: int, mesh, rules) -> dict[str, float]:
        """Image->text recall@k over the held-out set's distinct captions, and chance@k (see module docstring)."""
        def place(batch):
            return self.place(batch, mesh, rules)

        def host(x):  # the global rows, on every process
            return np.asarray(multihost_utils.process_allgather(x, tiled=True) if self.process_count > 1 else x)

        reader, rows = self._held_out(stage_index)
        local, seq_len = self.configs[stage_index].shapes.batch_size, self.configs[stage_index].shapes.seq_len
        n = len(reader)
        captions = self._held_out_captions(reader)
        unique = sorted(set(captions))
        image_embeds, text_embeds = [], {}
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for start in range(0, n, rows):  # the last batch wraps around to stay full-size
                flats = [(start + self.process_index * local + j) % n for j in range(local)]
                out = _embed(model, params, place(reader.batch(flats, self.tokenizer, seq_len)))
                image_embeds.append(host(out["image_embeds"]))
            image = np.concatenate(image_embeds)[:n]
            for start in range(0, len(unique), rows):
                texts = [unique[(start + self.process_index * local + j) % len(unique)] for j in range(local)]
                ids, mask = self.tokenizer.batch(texts, seq_len)
                batch = dict(pixel_values=np.zeros_like(self.example_batch(stage_index)["pixel_values"]), input_ids=ids,
                             attention_mask=mask)
                out = _embed(model, params, place(batch))
                for j, row in enumerate(host(out["text_embeds"])):
                    text_embeds.setdefault(unique[(start + j) % len(unique)], row)
        text = np.stack([text_embeds[c] for c in unique])
        truth = np.array([unique.index(c) for c in captions])
        out = retrieval_over_unique(image, text, truth, KS)
        if len(reader.sources) > 1:  # recall@1 of each held-out source (candidates: all U captions)
            for k, source in enumerate(reader.sources):
                part = slice(int(reader.offsets[k]), int(reader.offsets[k + 1]))
                hits = retrieval_over_unique(image[part], text, truth[part], (1,))["eval_recall@1"]
                out[f"eval_recall@1/{source.task.name}"] = hits
        return out


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, batch):
    return model.apply({"params": params}, **batch)


def retrieval_over_unique(image, text, truth, ks=KS) -> dict[str, float]:
    """image (N, D), text (U, D) unit-norm; truth (N,) the index of each image's caption. recall@k: share of
    images whose caption ranks in the top k (ties count against it); chance@k = min(k, U) / U."""
    sim = np.asarray(image, np.float32) @ np.asarray(text, np.float32).T
    correct = sim[np.arange(len(truth)), truth][:, None]
    rank = np.sum(sim >= correct, axis=1) - 1
    u = text.shape[0]
    out = {f"eval_recall@{k}": float(np.mean(rank < k)) for k in ks}
    out.update({f"eval_chance@{k}": min(k, u) / u for k in ks})
    out["eval_num_captions"] = float(u)
    return out
