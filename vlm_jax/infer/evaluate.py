"""Held-out metrics per source: VQA exact-match accuracy (greedy answers) and answer/caption perplexity.

Used by `vlm-jax eval`, by the trainer every `train.eval_every` steps (`train.eval_examples` records per
source) and by the demo.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import numpy as np

from vlm_jax.config import SourceConfig, TrainConfig
from vlm_jax.data import build_source, collate
from vlm_jax.data.bad_records import BadRecord, BadRecordCounter
from vlm_jax.infer.answer import Answerer
from vlm_jax.infer.vqa import exact_match, majority_baseline
from vlm_jax.registry import EVALUATORS
from vlm_jax.train.step import loss_sums


def source_label(s: SourceConfig) -> str:
    return f"{s.name}/{s.split}"


def read_records(source: SourceConfig, limit: int = 0, where: str = "data.eval_sources[?]", usable=None,
                 counter: BadRecordCounter | None = None) -> tuple[list, int]:
    """(the first `limit` (0 = all) readable records, how many were unreadable and skipped). `usable(record)`
    raises BadRecord for a record that cannot be used either (e.g. an undecodable image); `counter` (default:
    never stops) stops the read when too many are unusable."""
    reader = build_source(source, where)
    counter = counter or BadRecordCounter(max_fraction=1.0, min_records=1)
    records = []
    for i in range(len(reader) if limit <= 0 else min(limit, len(reader))):
        try:
            record = reader[i]
            if usable:
                usable(record)
        except BadRecord as e:
            counter.add_bad(e.reason, e.detail, f"{where} #{i}")
            continue
        counter.add_good()
        records.append(record)
    counter.check(final=True)
    return records, counter.bad


@dataclasses.dataclass
class SourceResult:
    label: str
    examples: int
    accuracy: float
    baseline: float  # the best constant answer: what a model blind to the image can reach at most
    perplexity: float  # exp(mean -log p) of the reference answers' tokens (and end of turn)
    skipped: int = 0
    tokens: np.ndarray | None = dataclasses.field(default=None, repr=False)  # the greedy answers' ids

    def row(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "tokens"}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _nll_and_tokens(model, params, batch, chunk):
    sums = loss_sums(model, params, batch, TrainConfig(loss_chunk=chunk))
    return sums.nll, sums.weight


def answer_perplexity(answerer: Answerer, records: list[dict]) -> float:
    """Teacher-forced perplexity of the reference turns, one record per row."""
    spec, shapes, pad = answerer.spec, answerer.data.shapes, answerer.template.pad_id
    nll = weight = 0.0
    for start in range(0, len(records), answerer.batch_size):
        examples = [answerer.preparer(r) for r in records[start:start + answerer.batch_size]]
        slots = max(1, max(e["num_slots"] for e in examples))
        batch = collate([[e] for e in examples], spec, dataclasses.replace(shapes, max_images=slots), pad)
        batch_nll, batch_weight = jax.device_get(_nll_and_tokens(answerer.model, answerer.params, batch,
                                                                 shapes.seq_len))
        nll, weight = nll + float(batch_nll), weight + float(batch_weight)
    return math.exp(nll / max(weight, 1.0))


def evaluate_records(answerer: Answerer, label: str, records: list[dict], skipped: int = 0,
                     perplexity: bool = True) -> SourceResult:
    tokens, references = answerer.generate_tokens(records)
    correct = [exact_match(p, r) for p, r in zip(answerer.decode(tokens), references)]
    return SourceResult(label, len(records), float(np.mean(correct)) if correct else 0.0,
                        majority_baseline(references),
                        answer_perplexity(answerer, records) if perplexity else float("nan"), skipped, tokens)


def read_sources(answerer: Answerer, sources: tuple[SourceConfig, ...], limit: int = 0,
                 where: str = "data.eval_sources") -> list[tuple[list, int]]:
    """`read_records` of every source (the config list `where`), with the answerer's data settings saying which
    records are usable."""
    def counter():
        return BadRecordCounter(answerer.data.max_bad_fraction, answerer.data.bad_fraction_min_records)

    return [read_records(s, limit, f"{where}[{i}]", answerer.preparer.prompt, counter())
            for i, s in enumerate(sources)]


def evaluate_read(answerer: Answerer, sources: tuple[SourceConfig, ...], read: list[tuple[list, int]],
                  perplexity: bool = True) -> list[SourceResult]:
    """The results of `read_sources`' records, which may be answered by several answerers in turn."""
    return [evaluate_records(answerer, source_label(s), *r, perplexity=perplexity) for s, r in zip(sources, read)]


def evaluate_sources(answerer: Answerer, sources: tuple[SourceConfig, ...], limit: int = 0,
                     perplexity: bool = True) -> list[SourceResult]:
    # Every record is read (and its images decoded) before the first is answered: bad data stops early.
    return evaluate_read(answerer, sources, read_sources(answerer, sources, limit), perplexity)


def text_table(header: list[str], rows: list[list[str]], notes: list[str] | None = None) -> str:
    """The command-line result tables: each column as wide as its widest cell, names (the first column) left
    and figures right, a row's note (if any) after it."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells, note=""):
        first, *rest = cells
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:]))]) + \
            (f"  {note}" if note else "")
    return "\n".join([line(header), *(line(r, n) for r, n in zip(rows, notes or [""] * len(rows)))])


def skipped_note(skipped: int, what: str = "unusable") -> str:
    return f"({skipped} {what} skipped)" if skipped else ""


def results_table(results: list[SourceResult]) -> str:
    return text_table(["source", "examples", "accuracy", "blind baseline", "perplexity"],
                      [[r.label, str(r.examples), f"{r.accuracy:.1%}", f"{r.baseline:.1%}", f"{r.perplexity:.3f}"]
                       for r in results], [skipped_note(r.skipped, "unreadable") for r in results])


@EVALUATORS.register("answer_accuracy")
def answer_accuracy(model, params, data, stage: int, limit: int, mesh, rules) -> dict[str, float]:
    """The trainer's periodic eval_accuracy/<source>: greedy answers to the first `limit` records of each held-out
    source of the stage's data (a PipelineData)."""
    config = data.data(stage)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        answerer = Answerer(model, params, data.tokenizer, config, batch_size=config.shapes.batch_size)
        results = evaluate_sources(answerer, config.eval_sources, limit, perplexity=False)
    return {f"eval_accuracy/{r.label}": r.accuracy for r in results}
