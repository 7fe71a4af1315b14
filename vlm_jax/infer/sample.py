"""`vlm-jax sample`: rejection sampling (as in Llama 3's post-training). N sampled answers per prompt from a
policy, scored by a reward model or a verifier; each prompt's best answer is kept when its score clears a
threshold, and the kept ones are written as an SFT dataset that `data.sources: [{kind: jsonl, path: ...}]` reads.
Beside it, on-policy preference pairs for DPO (Llama 3 pairs its policy's own samples): each kept answer as
`chosen` against its prompt's lowest-scored sample as `rejected`, where that one scored lower.

Sample k of every prompt is drawn with the key fold_in(seed, k), so the N answers to a prompt are distinct draws
and a prompt's answers do not depend on N. An empty answer is never kept (the JSONL reader rejects it), nor one
the reward model cannot score.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Callable

import jax
import numpy as np
from PIL import Image

from vlm_jax.config import SAMPLED_DATA_FILE as DATA_FILE
from vlm_jax.config import SAMPLED_PAIRS_FILE as PAIRS_FILE
from vlm_jax.config import DataConfig, SourceConfig
from vlm_jax.data import decode_image
from vlm_jax.data.bad_records import BadRecord
from vlm_jax.data.sources.jsonl import format_record
from vlm_jax.infer.answer import Answerer
from vlm_jax.infer.evaluate import read_sources, skipped_note, source_label, text_table
from vlm_jax.infer.score import Scorer, load_scorer
from vlm_jax.infer.vqa import exact_match
from vlm_jax.paths import write_atomic

IMAGE_DIR = "images"  # embedded (in-memory) images are written here as PNG files, referenced relatively

# (records, answers, reference answers) -> one score per answer (higher is better), None for one that cannot be
# scored (and is not kept).
ScoreFn = Callable[[list[dict], list[str], list[str]], list[float | None]]
# (records, sample index k) -> (one answer per record, reference answers)
DrawFn = Callable[[list[dict], int], tuple[list[str], list[str]]]


def prompt_turns(record: dict) -> list[tuple[str, str]]:
    """The turns a policy answers: all but a final assistant turn (the reference answer)."""
    turns = list(record["turns"])
    return turns[:-1] if turns and turns[-1][0] == "assistant" else turns


def answered(record: dict, answer: str) -> dict:
    """The SFT record of `answer` to `record`'s prompt (images kept)."""
    return {"images": record["images"], "turns": [*prompt_turns(record), ("assistant", answer)]}


def exact_match_scores(records: list[dict], answers: list[str], references: list[str]) -> list[float]:
    """The verifier: 1 for an answer that matches the reference (VQA normalisation), else 0."""
    return [float(exact_match(a, r)) for a, r in zip(answers, references)]


def reward_model_scores(scorer: Scorer) -> ScoreFn:
    def score(records, answers, references):
        rows = [answered(r, a) for r, a in zip(records, answers)]
        usable = []
        for i, row in enumerate(rows):
            try:
                scorer.examples(row)
            except BadRecord:  # e.g. nothing of the answer left within data.shapes.seq_len
                continue
            usable.append(i)
        scores = dict(zip(usable, scorer.score([rows[i] for i in usable])))
        return [scores[i]["score"] if i in scores else None for i in range(len(rows))]
    return score


def judge(verifier: str, reward_checkpoint: str, threshold: float | None, tokenizer: str, data: DataConfig,
          batch_size: int) -> tuple[ScoreFn, float]:
    """(score function, threshold a best score must clear): the exact-match verifier (scores 1 or 0), or the
    reward model at `reward_checkpoint` (every best answer kept when `threshold` is None)."""
    if verifier:
        return exact_match_scores, 0.5
    scorer = load_scorer(reward_checkpoint, tokenizer, data, batch_size=batch_size)
    return reward_model_scores(scorer), float("-inf") if threshold is None else threshold


def sample_sources(answerer: Answerer, sources: tuple[SourceConfig, ...], limit: int, score: ScoreFn,
                   threshold: float, num_samples: int, seed: int, where: str = "data.eval_sources"
                   ) -> list[SampleResult]:
    """`rejection_sample` of the first `limit` records of each source (0 = all; `where` names the list in errors)."""
    # Every record is read (and its images decoded) before the first is answered: bad data stops early.
    read = read_sources(answerer, sources, limit, where)
    draw = answerer_draw(answerer, seed)
    return [rejection_sample(source_label(s), records, draw, score, num_samples, threshold, skipped)
            for s, (records, skipped) in zip(sources, read)]


def answerer_draw(answerer: Answerer, seed: int) -> DrawFn:
    def draw(records, k):
        tokens, references = answerer.generate_tokens(records, jax.random.fold_in(jax.random.PRNGKey(seed), k))
        return answerer.decode(tokens), references
    return draw


@dataclasses.dataclass
class SampleResult:
    label: str
    prompts: int
    samples: int  # answers drawn
    # per kept prompt: {"record": the answered record, "score", "rejected": its prompt's lowest-scored answer when
    # that scored lower (else None), "rejected_score"}
    kept: list[dict]
    best_scores: list[float]  # per prompt with a scored answer, its best answer's score
    skipped: int = 0  # unreadable or unusable records

    def row(self) -> dict:
        return {"source": self.label, "prompts": self.prompts, "samples": self.samples, "kept": len(self.kept),
                "pairs": self.pairs,
                "fraction_kept": len(self.kept) / self.prompts if self.prompts else 0.0,
                "mean_best_score": float(np.mean(self.best_scores)) if self.best_scores else None,
                "skipped": self.skipped}

    @property
    def pairs(self) -> int:
        return sum(k["rejected"] is not None for k in self.kept)


def rejection_sample(label: str, records: list[dict], draw: DrawFn, score: ScoreFn, num_samples: int,
                     threshold: float, skipped: int = 0) -> SampleResult:
    """Each record's best of `num_samples` answers (the first of equal ones), kept when its score > `threshold`,
    with its worst (the last of equal ones) as the rejected answer of a pair when that scored lower."""
    answers, references = [], None
    for k in range(num_samples):
        drawn, references = draw(records, k)
        answers.append(drawn)
    # Every candidate is scored in one call: a reward model batches them however they fall.
    candidates = [(i, a) for k in range(num_samples) for i, a in enumerate(answers[k]) if a]
    scores = score([records[i] for i, _ in candidates], [a for _, a in candidates],
                   [references[i] for i, _ in candidates]) if candidates else []
    best: dict[int, tuple[float, str]] = {}
    worst: dict[int, tuple[float, str]] = {}
    for (i, answer), s in zip(candidates, scores):
        if s is None:
            continue
        if i not in best or s > best[i][0]:
            best[i] = (s, answer)
        if i not in worst or s <= worst[i][0]:
            worst[i] = (s, answer)
    kept = [{"record": answered(records[i], answer), "score": s,
             "rejected": worst[i][1] if worst[i][0] < s else None, "rejected_score": worst[i][0]}
            for i, (s, answer) in sorted(best.items()) if s > threshold]
    return SampleResult(label, len(records), len(records) * num_samples, kept,
                        [s for s, _ in best.values()], skipped)


def write_dataset(out, results: list[SampleResult]) -> int:
    """The kept answers of every source as `out`/data.jsonl and their pairs as `out`/pairs.jsonl (images that are
    no files as `out`/images/*.png, shared); returns the number of kept answers written. data.jsonl comes last:
    it marks the whole written."""
    lines, pairs = [], []
    for result in results:
        for kept in result.kept:
            record, refs = kept["record"], []
            for j, image in enumerate(record["images"]):
                if isinstance(image, str):  # a file the source named: an absolute path or URI stands alone
                    refs.append(image)
                    continue
                ref = f"{IMAGE_DIR}/{len(lines):06d}_{j}.png"
                buffer = io.BytesIO()
                Image.fromarray(decode_image(image)).save(buffer, "PNG")
                write_atomic(out / ref, buffer.getvalue())
                refs.append(ref)
            lines.append(format_record(refs, record["turns"], score=kept["score"], source=result.label))
            if kept["rejected"] is not None:
                pairs.append(format_record(refs, record["turns"][:-1], chosen=record["turns"][-1][1],
                                           rejected=kept["rejected"], score=kept["score"],
                                           rejected_score=kept["rejected_score"], source=result.label))
    write_atomic(out / PAIRS_FILE, "".join(line + "\n" for line in pairs))
    write_atomic(out / DATA_FILE, "".join(line + "\n" for line in lines))
    return len(lines)


def results_table(results: list[SampleResult]) -> str:
    rows = [r.row() for r in results]
    return text_table(["source", "prompts", "samples", "kept", "kept %", "pairs", "mean best"],
                      [[r.label, str(r.prompts), str(r.samples), str(len(r.kept)), f"{row['fraction_kept']:.1%}",
                        str(r.pairs),
                        "-" if row["mean_best_score"] is None else f"{row['mean_best_score']:.3f}"]
                       for r, row in zip(results, rows)], [skipped_note(r.skipped) for r in results])
