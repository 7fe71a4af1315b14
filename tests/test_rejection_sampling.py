"""Rejection sampling (`vlm-jax sample`): each prompt's best answer is kept only when it clears the bar, paired
with the prompt's worst answer when that scored lower, the N samples are distinct draws, and the written answers
and pairs read back through the jsonl source."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax.cli import main as cli_main
from vlm_jax.config import SourceConfig
from vlm_jax.data import EmbeddedSource, build_source, decode_image
from vlm_jax.data.bad_records import BadRecord
from vlm_jax.errors import UserError
from vlm_jax.infer.answer import Answerer
from vlm_jax.infer.generate import Sampling
from vlm_jax.infer.sample import (SampleResult, answered, answerer_draw, exact_match_scores, rejection_sample,
                                  reward_model_scores, sample_sources, write_dataset)


def _fake_draw(answers_per_sample):
    """A generator whose sample k answers record i with answers_per_sample[k][i]; references as the records'."""
    def draw(records, k):
        return list(answers_per_sample[k]), [r["turns"][-1][1] for r in records]
    return draw


RECORDS = [{"images": [], "turns": [("user", f"q{i}"), ("assistant", ref)]} for i, ref in enumerate(["3", "red", "7"])]


def test_verifier_keeps_only_correct_answers_once_per_prompt():
    draw = _fake_draw([["three", "blue", ""], ["3", "green", "1"], ["2", "yellow", "seven"]])
    result = rejection_sample("t", RECORDS, draw, exact_match_scores, num_samples=3, threshold=0.5, skipped=2)
    # prompt 0: two correct answers, the first kept once; prompt 1: none correct; prompt 2: one correct
    assert [k["record"]["turns"] for k in result.kept] == [[("user", "q0"), ("assistant", "three")],
                                                          [("user", "q2"), ("assistant", "seven")]]
    # each against its prompt's last wrong answer (the empty one is no answer)
    assert [(k["rejected"], k["rejected_score"]) for k in result.kept] == [("2", 0.0), ("1", 0.0)]
    assert result.row() == {"source": "t", "prompts": 3, "samples": 9, "kept": 2, "pairs": 2, "fraction_kept": 2 / 3,
                            "mean_best_score": 2 / 3, "skipped": 2}
    all_right = rejection_sample("t", RECORDS[:1], _fake_draw([["3"], ["three"]]), exact_match_scores, num_samples=2,
                                 threshold=0.5)
    assert [k["rejected"] for k in all_right.kept] == [None] and all_right.pairs == 0  # no lower-scored answer


def test_reward_keeps_the_best_answer_above_the_threshold():
    draw = _fake_draw([["a", "b", ""], ["aa", "bb", ""]])
    scores = {"a": 0.1, "aa": 0.9, "b": -1.0, "bb": -0.5}

    def score(records, answers, references):
        assert "" not in answers  # an empty answer is never scored nor kept
        return [scores[a] for a in answers]

    result = rejection_sample("t", RECORDS, draw, score, num_samples=2, threshold=0.0)
    assert [(k["record"]["turns"][-1][1], k["score"], k["rejected"]) for k in result.kept] == [("aa", 0.9, "a")]
    assert result.best_scores == [0.9, -0.5]
    everything = rejection_sample("t", RECORDS, draw, score, num_samples=2, threshold=float("-inf"))
    assert [k["record"]["turns"][-1][1] for k in everything.kept] == ["aa", "bb"]


def test_the_reward_model_scores_the_answered_records():
    class FakeScorer:
        def examples(self, record):
            if record["turns"][-1][1] == "too long":
                raise BadRecord("too_long", "nothing left to supervise")

        def score(self, records):
            assert [r["turns"][0][1] for r in records] == ["q0", "q2"]
            return [{"score": float(len(r["turns"]) * 10 + len(r["turns"][-1][1]))} for r in records]

    scores = reward_model_scores(FakeScorer())(RECORDS, ["ab", "too long", "abcd"], ["3", "red", "7"])
    assert scores == [22.0, None, 24.0]
    result = rejection_sample("t", RECORDS, _fake_draw([["ab", "too long", "abcd"]]), reward_model_scores(FakeScorer()),
                              num_samples=1, threshold=float("-inf"))
    assert [k["record"]["turns"][0][1] for k in result.kept] == ["q0", "q2"]


def test_samples_are_distinct_reproducible_draws(trained_like):
    cfg, model, params, tokenizer, _ = trained_like
    answerer = Answerer(model, params, tokenizer, cfg.data, batch_size=4, max_new_tokens=6,
                        sampling=Sampling(temperature=1.0))
    records = [EmbeddedSource("digits_qa", "test")[i] for i in range(2)]
    draw = answerer_draw(answerer, seed=0)
    answers = [draw(records, k)[0] for k in range(3)]
    for i in range(len(records)):
        assert len({a[i] for a in answers}) == 3, [a[i] for a in answers]
    assert draw(records, 1)[0] == answers[1]
    assert answerer_draw(answerer, seed=1)(records, 1)[0] != answers[1]


def test_each_batch_draws_its_own_noise(trained_like):
    cfg, model, params, tokenizer, _ = trained_like
    answerer = Answerer(model, params, tokenizer, cfg.data, batch_size=1, max_new_tokens=6,
                        sampling=Sampling(temperature=1.0))
    record = EmbeddedSource("digits_qa", "test")[0]
    first, second = answerer.generate_tokens([record, record], jax.random.PRNGKey(0))[0]
    assert not np.array_equal(first, second)  # one prompt, two batches: two draws, not the same one twice


def test_written_dataset_reads_back_through_the_jsonl_source(tmp_path):
    Image.fromarray(np.full((20, 24, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    embedded = [EmbeddedSource("digits_qa", "test")[i] for i in range(2)]
    on_disk = {"images": [str(tmp_path / "red.png")], "turns": [("system", "Be brief."), ("user", "<image>Colour?"),
                                                                 ("assistant", "red")]}
    kept = [answered(embedded[0], "7"), answered(embedded[1], "one"), answered(on_disk, "red, \"quoted\"\nline")]
    out = tmp_path / "out"
    rejected = [None, "two", "blue"]
    entries = [{"record": r, "score": 1.0, "rejected": x, "rejected_score": 0.0} for r, x in zip(kept, rejected)]
    written = write_dataset(out, [SampleResult("a", 2, 4, entries[:2], []), SampleResult("b", 1, 2, entries[2:], [])])
    assert written == 3 and sorted(p.name for p in (out / "images").iterdir()) == ["000000_0.png", "000001_0.png"]
    source = build_source(SourceConfig(kind="jsonl", name="sampled", path=str(out / "data.jsonl")))
    assert len(source) == 3
    for want, got in zip(kept, (source[i] for i in range(3))):
        assert got["turns"] == want["turns"]
        assert len(got["images"]) == 1
        np.testing.assert_array_equal(decode_image(got["images"][0]), decode_image(want["images"][0]))
    assert source[2]["images"] == on_disk["images"]  # a file image is referenced, not copied

    pairs = build_source(SourceConfig(kind="jsonl", name="pairs", path=str(out / "pairs.jsonl")))
    assert len(pairs) == 2  # the kept answers that have a worse one
    for want, answer, got in zip(kept[1:], rejected[1:], (pairs[i] for i in range(2))):
        assert got["turns"] == want["turns"][:-1] and got["chosen"] == want["turns"][-1][1] and got["rejected"] == answer
        np.testing.assert_array_equal(decode_image(got["images"][0]), decode_image(want["images"][0]))


def _config(tmp_path, cfg):
    config = tmp_path / "sample.yaml"
    config.write_text("data:\n  eval_sources: [{kind: embedded, name: digits_qa, split: test}]\n"
                      f"  shapes: {{batch_size: 4, seq_len: 32, max_images: 1}}\n  tokenizer: {cfg.data.tokenizer}\n")
    return str(config)


def test_sample_command_writes_the_kept_answers_and_refuses_an_existing_out(trained_like, tmp_path, capsys):
    cfg, _, _, _, ckpt = trained_like
    out, report = tmp_path / "sampled", tmp_path / "summary.json"
    args = ["sample", "--config", _config(tmp_path, cfg), "--checkpoint", ckpt, "--verifier", "exact_match",
            "--out", str(out), "--num-samples", "2", "--limit", "3", "--batch-size", "4", "--max-new-tokens", "2"]
    assert cli_main(args + ["--json", str(report)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    [row] = json.loads(report.read_text())
    assert {k: row[k] for k in ("source", "prompts", "samples", "skipped")} == {
        "source": "digits_qa/test", "prompts": 3, "samples": 6, "skipped": 0}
    lines = (out / "data.jsonl").read_text().splitlines()
    assert len(lines) == row["kept"] and f"kept {row['kept']} of 3 prompts" in printed
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == row["pairs"] and f"{row['pairs']} preference pairs" in printed
    for pair in pairs:  # a correct answer against a wrong one
        assert pair["score"] == 1.0 and pair["rejected_score"] == 0.0
    references = [EmbeddedSource("digits_qa", "test")[i]["turns"][-1][1] for i in range(3)]
    for line in lines:  # only correct answers
        answer = json.loads(line)["conversations"][-1]["value"]
        assert any(exact_match_scores([{}], [answer], [r]) == [1.0] for r in references)

    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err
    assert (out / "data.jsonl").read_text().splitlines() == lines  # untouched


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0"], "--temperature 0"),
    (["--threshold", "0.5"], "--threshold applies to --reward-checkpoint"),
])
def test_mistakes_are_one_line(extra, message, tmp_path, capsys):
    args = ["sample", "--config", str(tmp_path / "none.yaml"), "--checkpoint", str(tmp_path), "--verifier",
            "exact_match", "--out", str(tmp_path / "o")]
    assert cli_main(args + extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_a_missing_source_is_named_where_the_config_lists_it(trained_like, tmp_path):
    cfg, model, params, tokenizer, _ = trained_like
    answerer = Answerer(model, params, tokenizer, cfg.data, batch_size=4, max_new_tokens=2)
    missing = SourceConfig(kind="jsonl", name="prompts", path=str(tmp_path / "absent.jsonl"))
    with pytest.raises(UserError, match=r"^train\.stages\[4\]\.data\.sources\[0\].*absent\.jsonl"):
        sample_sources(answerer, (missing,), 2, exact_match_scores, 0.5, 1, 0, "train.stages[4].data.sources")
