"""`vlm-jax score`: a reward model's (model.reward_head) score of each record's answer, and its pairwise accuracy
on preference records (the chosen answer scored above the rejected one; a tie counts half, as in training).

Records go through the data pipeline's preparer like training's (an SFT record's last assistant turn, or a
preference record's chosen and rejected answers after its prompt), in right-padded batches of `batch_size`
rows, scored by the jitted model with its parameters sharded over every device (as `vlm-jax eval` does).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from vlm_jax.config import DataConfig, SourceConfig
from vlm_jax.data import ExamplePreparer, collate, get_template
from vlm_jax.data.bad_records import BadRecordCounter
from vlm_jax.errors import UserError
from vlm_jax.families import get_family
from vlm_jax.infer.answer import restore_model
from vlm_jax.infer.evaluate import read_records, skipped_note, source_label, text_table
from vlm_jax.objectives.reward import reward_scores


@functools.partial(jax.jit, static_argnums=0)
def _row_scores(model, params, batch):
    return reward_scores(model, params, get_family(model.config).model_kwargs(batch), batch["loss_mask"])


@dataclasses.dataclass
class SourceScores:
    label: str
    records: list[dict]  # per scored record: {"score"} (SFT) or {"chosen_score", "rejected_score"} (preference)
    skipped: int = 0

    @property
    def margins(self) -> np.ndarray:
        return np.array([r["chosen_score"] - r["rejected_score"] for r in self.records if "chosen_score" in r])

    def row(self) -> dict:
        m = self.margins
        return {"source": self.label, "records": len(self.records), "pairs": len(m), "skipped": self.skipped,
                "pairwise_accuracy": float(np.mean((m > 0) + 0.5 * (m == 0))) if len(m) else None}


class Scorer:
    def __init__(self, model, params, tokenizer, data: DataConfig, batch_size: int = 32):
        self.model, self.params, self.data, self.batch_size = model, params, data, batch_size
        self.spec = get_family(model.config).input_spec(model.config)
        self.template = get_template(data.template, tokenizer)
        self.preparers = {pairs: ExamplePreparer(self.spec, self.template, data.image, data.shapes, pairs)
                          for pairs in (False, True)}

    def examples(self, record: dict) -> list[dict]:
        """The record's answers as training rows (raises BadRecord): [answer] or [chosen, rejected]."""
        prepared = self.preparers["chosen" in record](record)
        return prepared.get("pair", [prepared])

    def score(self, records: list[dict]) -> list[dict]:
        rows = [e for r in records for e in self.examples(r)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            shapes = dataclasses.replace(self.data.shapes, batch_size=self.batch_size,
                                         max_images=max(1, max(e["num_slots"] for e in chunk)))
            batch = collate([[e] for e in chunk] + [[]] * (self.batch_size - len(chunk)), self.spec, shapes,
                            self.template.pad_id)
            scores.append(np.asarray(jax.device_get(_row_scores(self.model, self.params, batch)))[:len(chunk)])
        scores, out = iter(np.concatenate(scores).tolist() if scores else []), []
        for r in records:
            out.append({"chosen_score": next(scores), "rejected_score": next(scores)} if "chosen" in r
                       else {"score": next(scores)})
        return out

    def score_sources(self, sources: tuple[SourceConfig, ...], limit: int = 0) -> list[SourceScores]:
        def counter():
            return BadRecordCounter(self.data.max_bad_fraction, self.data.bad_fraction_min_records)

        # Every record is read and prepared before the first is scored: bad data stops early.
        read = [read_records(s, limit, f"data.eval_sources[{i}]", self.examples, counter())
                for i, s in enumerate(sources)]
        return [SourceScores(source_label(s), self.score(records), skipped)
                for s, (records, skipped) in zip(sources, read)]


def load_scorer(checkpoint_path: str, tokenizer: str = "", data: DataConfig | None = None,
                batch_size: int = 32) -> Scorer:
    """A Scorer for a reward model's checkpoint; the data settings are the run's own unless `data` is given."""
    def reward_family(m):
        if not m.reward_head:
            raise UserError(f"{checkpoint_path} is no reward model (its model.reward_head is false); train one with "
                            "model.reward_head=true train.objective=reward")
        return get_family(m)

    config, model, params, tokenizer = restore_model(checkpoint_path, tokenizer, reward_family)
    return Scorer(model, params, tokenizer, data or config.data, batch_size)


def results_table(results: list[SourceScores]) -> str:
    rows = [r.row() for r in results]
    return text_table(["source", "records", "pairs", "pairwise accuracy"],
                      [[r.label, str(row["records"]), str(row["pairs"]),
                        "-" if row["pairwise_accuracy"] is None else f"{row['pairwise_accuracy']:.1%}"]
                       for r, row in zip(results, rows)], [skipped_note(r.skipped) for r in results])
