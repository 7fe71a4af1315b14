"""Answering questions about images: VQA normalisation, JAX answers equal transformers' generate on the
exported model for real prompts, batching does not change answers, and the `generate` / `eval` commands."""
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.cli import main as cli_main
from vlm_jax.convert import to_hf
from vlm_jax.data import EmbeddedSource
from vlm_jax.infer.answer import Answerer
from vlm_jax.infer.hf_reference import hf_generate, load_hf_mllama
from vlm_jax.infer.vqa import exact_match, majority_baseline, normalize_answer

TASKS = ("digits_qa", "shapes_color", "chart_count")


def test_vqa_normalisation():
    assert normalize_answer("  The Two.") == "2"
    assert normalize_answer("a red, circle!") == "red circle"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("dont") == "don't"
    assert exact_match("Seven", "7") and exact_match("an apple", "apple") and not exact_match("7", "1")
    assert majority_baseline(["1", "one", "2", "3"]) == 0.5 and majority_baseline([]) == 0.0


def _records(n_per_task=5):
    return [EmbeddedSource(t, "test")[i] for t in TASKS for i in range(n_per_task)]


def test_answers_equal_transformers_generate_and_do_not_depend_on_batching(trained_like, tmp_path):
    cfg, model, params, tokenizer, _ = trained_like
    answerer = Answerer(model, params, tokenizer, cfg.data, batch_size=8, max_new_tokens=5)
    records = _records()
    ours, references = answerer.generate_tokens(records)
    assert ours.shape == (len(records), 5) and references[0] == records[0]["turns"][-1][1]
    assert len({tuple(row) for row in ours}) > 1  # not one constant answer

    to_hf(model, params, str(tmp_path / "hf"))
    hf_model = load_hf_mllama(str(tmp_path / "hf"))
    theirs, _ = answerer.generate_tokens(records, backend=lambda p: hf_generate(hf_model, p, answerer.sampling))
    np.testing.assert_array_equal(ours, theirs)

    one_by_one = Answerer(model, params, tokenizer, cfg.data, batch_size=1, max_new_tokens=5)
    np.testing.assert_array_equal(np.concatenate([one_by_one.generate_tokens([r])[0] for r in records[:6]]),
                                  ours[:6])


def test_generate_and_eval_commands(trained_like, tmp_path, capsys):
    cfg, _, _, _, ckpt = trained_like
    image = tmp_path / "digit.png"
    Image.fromarray(EmbeddedSource("digits_qa", "test")[0]["images"][0]).save(image)
    rc = cli_main(["generate", "--checkpoint", ckpt, "--image", str(image), "--prompt", "What digit is this?",
                   "--max-new-tokens", "4"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 1 and out[0].split("\t")[:2] == [str(image), "What digit is this?"]
    # One line per prompt in the same form, whatever the count: image, prompt, answer (tab, newline escaped).
    other = tmp_path / "shape.png"
    Image.fromarray(EmbeddedSource("shapes_color", "test")[0]["images"][0]).save(other)
    prompts = ["What digit is this?", "What color\tis the shape?"]
    rc = cli_main(["generate", "--checkpoint", ckpt, "--image", str(image), "--image", str(other),
                   "--prompt", prompts[0], "--prompt", prompts[1], "--temperature", "0.7", "--top-p", "0.9",
                   "--json", str(tmp_path / "answers.json")])
    lines = capsys.readouterr().out.splitlines()
    rows = json.loads((tmp_path / "answers.json").read_text())
    assert rc == 0 and [(r["image"], r["prompt"]) for r in rows] == [(str(image), prompts[0]), (str(other), prompts[1])]
    assert lines == ["\t".join(v.replace("\t", "\\t").replace("\n", "\\n") for v in r.values()) for r in rows]

    config = tmp_path / "eval.yaml"
    config.write_text("data:\n  eval_sources: [{kind: embedded, name: digits_qa, split: test},"
                      " {kind: embedded, name: shapes_color, split: test, size: 12}]\n"
                      "  shapes: {batch_size: 4, seq_len: 32, max_images: 1}\n")
    rc = cli_main(["eval", "--config", str(config), "--checkpoint", ckpt, "--limit", "10",
                   "--json", str(tmp_path / "eval.json"), f"data.tokenizer={cfg.data.tokenizer}"])
    assert rc == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [r["label"] for r in rows] == ["digits_qa/test", "shapes_color/test"] and "digits_qa/test" in table
    assert [r["examples"] for r in rows] == [10, 10]
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["baseline"] <= 1 and r["perplexity"] > 1 for r in rows)

    # The export carries the run's tokenizer, so the Hugging Face directory is self-contained.
    assert cli_main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    with open(tmp_path / "hf" / "tokenizer.model", "rb") as a, open(cfg.data.tokenizer, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("argv, expected", [
    (["--image", "missing.png", "--prompt", "q"], "--image missing.png: file not found"),
    (["--image", "a.png", "--image", "b.png", "--prompt", "q"], "2 --image for 1 --prompt"),
])
def test_generate_bad_input_is_one_line(trained_like, argv, expected, capsys):
    rc = cli_main(["generate", "--checkpoint", trained_like[4], *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
