"""The Grain pipeline: global shuffled mixture -> this process's shard -> prepared examples -> batches.

Records are addressed by global position in a deterministic, per-epoch reshuffled, weighted mixture
(grain MapDataset: shuffle, repeat, mix). Reading and preparing run in grain reader threads and optional
worker processes; packing and batching run here, in order, so batches do not depend on the worker count.
Unusable records become markers rather than being filtered in the workers, which keeps the order
(and the iterator state) a pure function of the stream index.
"""
from __future__ import annotations

import atexit
import sys
import weakref

import grain
from absl import flags
import numpy as np
from grain.experimental import ThreadPrefetchDatasetIterator

from vlm_jax.errors import ConfigError
from vlm_jax.data.bad_records import BadRecord, BadRecordCounter
from vlm_jax.data.batching import collate
from vlm_jax.config import DataConfig, SourceConfig, validate_data
from vlm_jax.data.examples import ExamplePreparer
from vlm_jax.data.packing import RowPacker
from vlm_jax.data.sources import build_source
from vlm_jax.data.spec import InputSpec
from vlm_jax.data.state import Cursor
from vlm_jax.data.templates import get_template
from vlm_jax.data.tokenizer import Tokenizer


class _Labelled:
    """A source whose records (and failures) say where they came from, for the bad-record log."""

    def __init__(self, source, label: str):
        self.source, self.label = source, label

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        where = f"{self.label}[{index}]"
        try:
            return {**self.source[index], "where": where}
        except BadRecord as e:
            e.where = where
            raise


def _source_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _records(sources: tuple[SourceConfig, ...], seed: int, train: bool, key: str) -> grain.MapDataset:
    """Training: each source shuffled (reshuffled every epoch), repeated forever, mixed by weight.
    Evaluation: the sources concatenated once, in order."""
    datasets = [grain.MapDataset.source(_Labelled(build_source(s, f"{key}[{k}]"), f"{s.kind}:{s.name}/{s.split}"))
                for k, s in enumerate(sources)]
    if not train:
        return grain.MapDataset.concatenate(datasets) if len(datasets) > 1 else datasets[0]
    datasets = [d.shuffle(seed=_source_seed(seed, k)).repeat() for k, d in enumerate(datasets)]
    return grain.MapDataset.mix(datasets, [s.weight for s in sources]) if len(datasets) > 1 else datasets[0]


class _Loader:
    """Stream index -> prepared example, or a marker: {"kind": "bad" | "skip" | "pad", "index": i, ...}."""

    def __init__(self, records: grain.MapDataset, prepare: ExamplePreparer, cursor: Cursor, total: int | None):
        self.records, self.prepare, self.cursor, self.total = records, prepare, cursor, total

    def __call__(self, index: int) -> dict:
        position = self.cursor.position(index)
        if position in self.cursor.skip:
            return {"kind": "skip", "index": index}
        if self.total is not None and position >= self.total:
            return {"kind": "pad", "index": index}
        where = f"#{position}"
        try:
            record = self.records[position]
            where = record["where"]
            return {**self.prepare(record), "kind": "good", "index": index}
        except BadRecord as e:
            return {"kind": "bad", "index": index, "reason": e.reason, "detail": e.detail,
                    "where": getattr(e, "where", where)}


class BatchIterator(grain.DatasetIterator):
    """Batches for one process; `get_state()` is JSON (see state.py) and `set_state` resumes exactly."""

    def __init__(self, cfg: DataConfig, records: grain.MapDataset, prepare: ExamplePreparer,
                 spec: InputSpec, pad_id: int, cursor: Cursor, train: bool):
        super().__init__()
        self._cfg, self._records, self._prepare, self._spec, self._pad_id = cfg, records, prepare, spec, pad_id
        self._train = train
        self._set_cursor(cursor, {"good": 0, "bad": {}, "truncated": 0})

    def _set_cursor(self, cursor: Cursor, records: dict):
        self._cursor = cursor
        self._counter = BadRecordCounter(self._cfg.max_bad_fraction, self._cfg.bad_fraction_min_records,
                                         records["bad"], records["good"])
        self._truncated = records["truncated"]
        self._pending: dict | None = None  # read but not yet placed: it opens the next batch
        self._elements = None  # opened lazily, so set_state before the first batch starts no workers

    def _stream_length(self) -> int:
        if self._train:
            return sys.maxsize
        # Every process gets the same number of stream slots (padding past the end), hence of eval batches.
        return -(-len(self._records) // self._cursor.process_count)

    def _open(self):
        w = self._cfg.workers
        loader = _Loader(self._records, self._prepare, self._cursor, None if self._train else len(self._records))
        ds = grain.MapDataset.range(self._cursor.next, self._stream_length()).map(loader)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=w.read_threads, prefetch_buffer_size=w.buffer_size))
        if w.num_workers:
            # Grain reads absl flags when starting workers; outside absl.app they are unparsed and the
            # read raises. Marking them parsed keeps every flag at its default.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=w.num_workers,
                                                             per_worker_buffer_size=w.buffer_size))
        return iter(ds)

    def _take(self) -> dict:
        if self._pending is not None:
            element, self._pending = self._pending, None
            return element
        if self._elements is None:
            self._elements = self._open()
        return next(self._elements)

    def _count(self, element: dict) -> bool:
        """Counts the element; True if it is a usable example."""
        if element["kind"] == "bad":
            self._counter.add_bad(element["reason"], element["detail"], element["where"])
        elif element["kind"] == "good":
            self._counter.add_good()
            self._truncated += element["truncated"]
        return element["kind"] == "good"

    def _rows(self, element: dict) -> list[list[dict]]:
        """Counts the element; the batch rows it fills (a preference pair: two, chosen then rejected; an
        unusable element of a held-out stream: empty ones)."""
        usable = self._count(element)
        if self._prepare.pairs:
            return [[e] for e in element["pair"]] if usable else [[], []]
        return [[element] if usable else []]

    def __next__(self) -> dict[str, np.ndarray]:
        shapes = self._cfg.shapes
        if not self._train or self._prepare.pairs:
            return self._next_rows()
        packer = RowPacker(shapes.batch_size, shapes.seq_len, shapes.max_images, self._cfg.packing.enabled)
        while True:
            element = self._take()
            if element["kind"] == "good" and not packer.add(element):
                self._pending = element
                break
            self._count(element)
            self._cursor.next = element["index"] + 1
        return collate(packer.rows, self._spec, shapes, self._pad_id)

    def _next_rows(self) -> dict[str, np.ndarray]:
        """Unpacked rows: one per stream slot (two for a preference pair). Held out, bad records and padding
        leave their rows empty (segment_ids all 0); in training they are skipped."""
        rows = []
        while len(rows) < self._cfg.shapes.batch_size:
            try:
                element = self._take()
            except StopIteration:
                break
            rows += [r for r in self._rows(element) if r or not self._train]
            self._cursor.next = element["index"] + 1
        if not rows:
            self._counter.check(final=True)
            raise StopIteration
        rows += [[] for _ in range(self._cfg.shapes.batch_size - len(rows))]
        return collate(rows, self._spec, self._cfg.shapes, self._pad_id)

    def get_state(self) -> dict:
        return {**self._cursor.state(), "records": {**self._counter.state(), "truncated": self._truncated}}

    def set_state(self, state: dict):
        cursor = Cursor.from_state(state)
        if (cursor.process_index, cursor.process_count) != (self._cursor.process_index, self._cursor.process_count):
            raise ValueError(f"data iterator state is for process {cursor.process_index} of {cursor.process_count}, "
                             f"this is process {self._cursor.process_index} of {self._cursor.process_count}; "
                             "re-shard it with vlm_jax.data.restore_state or reshard_states")
        self.close()
        self._closed = False
        self._set_cursor(cursor, state["records"])

    def close(self):
        if self._elements is not None:
            self._elements.close()
            self._elements = None
        super().close()


def build_pipeline(cfg: DataConfig, tokenizer: Tokenizer, spec: InputSpec, process_index: int = 0,
                   process_count: int = 1, *, train: bool = True, state: dict | None = None,
                   pairs: bool = False) -> grain.DatasetIterator:
    """Iterator of batches (dicts of numpy arrays, see batching.py) for this process.

    train=True: `cfg.sources`, mixed, reshuffled each epoch, endless; packing per cfg.packing.
    train=False: `cfg.eval_sources` once, in order, unpacked, one row per record, ending with StopIteration;
    every process yields the same number of batches.
    pairs=True: preference records, unpacked, rows 2i / 2i+1 the chosen / rejected answer of one record.
    `state`: from `get_state()` (or `restore_state`) of an earlier run, to continue exactly.
    """
    validate_data(cfg)
    if pairs and cfg.packing.enabled:
        raise ConfigError("data.packing.enabled: preference pairs are not packed yet; set data.packing.enabled=false")
    if pairs and cfg.shapes.batch_size % 2:
        raise ConfigError(f"data.shapes.batch_size ({cfg.shapes.batch_size}) must be even for preference pairs "
                          "(a chosen and a rejected row each)")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is outside [0, {process_count})")
    if not train and not cfg.eval_sources:
        raise ConfigError("data.eval_sources is empty; list the held-out sources to evaluate on")
    if not spec.unified and cfg.image.op == "mllama_tile" and cfg.image.max_tiles != spec.max_tiles:
        raise ConfigError(f"data.image.max_tiles ({cfg.image.max_tiles}) must equal the model's max_num_tiles "
                          f"({spec.max_tiles}) for mllama_tile")
    if not spec.unified and cfg.image.op != "mllama_tile":
        raise ConfigError(f"data.image.op '{cfg.image.op}' does not fit a cross-attention (Mllama) model; "
                          "use mllama_tile")
    if spec.unified and cfg.image.op == "mllama_tile":
        raise ConfigError("data.image.op 'mllama_tile' needs a cross-attention model; use resize or catty_tile")
    template = get_template(cfg.template, tokenizer)
    if spec.image_token_id is not None and spec.image_token_id != template.image_id:
        raise ConfigError(f"the tokenizer's <|image|> id ({template.image_id}) differs from the model's "
                          f"image_token_index ({spec.image_token_id}); use the checkpoint's tokenizer")
    sources, key = (cfg.sources, "data.sources") if train else (cfg.eval_sources, "data.eval_sources")
    records = _records(sources, cfg.seed, train, key)
    prepare = ExamplePreparer(spec, template, cfg.image, cfg.shapes, pairs)
    iterator = BatchIterator(cfg, records, prepare, spec, template.pad_id, Cursor(process_index, process_count), train)
    if state is not None:
        iterator.set_state(state)
    if cfg.workers.prefetch_batches:
        iterator = ThreadPrefetchDatasetIterator(iterator, cfg.workers.prefetch_batches)
    atexit.register(_close_if_alive, weakref.ref(iterator))
    return iterator


def _close_if_alive(ref: weakref.ref):
    """Closing before interpreter teardown stops worker processes and threads cleanly (grain's own
    finalizer runs too late and prints tracebacks when an iterator was never closed)."""
    if (iterator := ref()) is not None:
        iterator.close()
