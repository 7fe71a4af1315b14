"""Training from the Grain pipeline (data.sources set): the loss falls on an embedded task, held-out eval is
logged, a run cut in two resumes bitwise exactly with the data stream continuing, config mistakes are one line."""
import os

import pytest

from vlm_jax.cli import main as cli_main
from vlm_jax.config import load_config, stage_data_config
from vlm_jax.data import load_tokenizer
from vlm_jax.errors import ConfigError
from vlm_jax.families import get_family
from vlm_jax.train.data import open_train_data
from vlm_jax.train.recipe import resolve_stages
from vlm_jax.train.loop import Trainer
from train_helpers import (TINY, check_learning_run, check_resume_matches_reference,
                           data_iter, reference_run, tiny_config)

STEPS = 8
DATA = ["model.image_token_index=1",  # the <|image|> id of the tokenizer trained on the embedded tasks
        "data.sources=[{kind: embedded, name: digits_qa}]",
        "data.eval_sources=[{kind: embedded, name: digits_qa, split: test}]",
        "data.shapes={batch_size: 8, seq_len: 32, max_images: 1}",
        "train.log.every_steps=1", "train.checkpoint.async_save=false", "train.checkpoint.every_steps=4"]
FULL = [f"train.steps={STEPS}", "train.eval_every=4", "train.eval_batches=3", "train.eval_examples=6", *DATA]
# The same single stage, cut at half: `train.steps` then only says where this run stops (same schedule).
CUT = [f"train.stages=[{{name: train, steps: {STEPS}}}]", *DATA]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory, tiny_config, FULL)


def test_trains_on_embedded_task_and_logs_eval(reference):
    workdir, trainer, result = reference
    records = check_learning_run(result, workdir, STEPS, [4, 8])
    # The tokenizer was trained once into the workdir; its <|image|> id is what the config says.
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.model"))
    assert tokenizer.image_id == 1 and tokenizer.vocab_size <= 128
    accuracy = [r["eval_accuracy/digits_qa/test"] for r in records if "eval_loss" in r]
    assert len(accuracy) == 2 and all(a in {k / 6 for k in range(7)} for a in accuracy)  # greedy, 6 answers
    assert all(0 < r["supervised_fraction"] < 1 for r in records)
    # Every row read is a different sample (8 batches of 8 from a 1437-example split: no epoch boundary).
    rows = [h for batch in trainer.batches for h in batch]
    assert len(trainer.batches) == STEPS and len(set(rows)) == len(rows) == STEPS * 8


def test_resume_continues_data_stream_and_is_bitwise_exact(reference, tmp_path):
    workdir = str(tmp_path / "cut")
    messages = check_resume_matches_reference(reference, tiny_config, workdir, CUT, STEPS)
    assert not any("trained a" in m for m in messages)  # the workdir's tokenizer is reused
    half = data_iter(workdir, STEPS // 2)
    assert half["stage"] == 0 and half["iter"]["kind"] == "grain"
    (state,) = half["iter"]["process_states"]
    assert state["next"] >= STEPS // 2 * 8 and state["process_count"] == 1


def test_image_token_mismatch_is_one_line_config_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path, *FULL, "model.image_token_index=128")
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, echo=lambda _: None)
    message = str(e.value)
    assert "\n" not in message and "model.image_token_index (128)" in message and "image_token_index=1" in message
    # Through the CLI: exit 2, one line on stderr, no traceback.
    rc = cli_main(["train", "--config", TINY, f"workdir={tmp_path}", *FULL, "model.image_token_index=128"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "image_token_index" in err and "Traceback" not in err


def test_stage_data_overrides_are_typed_and_no_data_is_refused(tmp_path):
    assert load_config(TINY).data.sources == ()  # no `data:` section: no sources, and nothing generated unasked
    assert load_config(TINY, ["data.shapes.seq_len=16"]).data.sources == ()
    with pytest.raises(ConfigError, match=r"data.sources is empty; .* or set train.synthetic.enabled=true"):
        Trainer(load_config(TINY, [f"workdir={tmp_path}", "train.steps=1"]), echo=lambda _: None)
    cfg = tiny_config(tmp_path, *DATA)
    merged = stage_data_config(cfg.data, {"shapes": {"seq_len": 16}, "image": {"max_tiles": 4}})
    assert merged.shapes.seq_len == 16 and merged.shapes.batch_size == 8 and merged.sources == cfg.data.sources
    assert stage_data_config(cfg.data, None) is cfg.data
    with pytest.raises(ConfigError, match=r"train.stages\[0\].data: expected a mapping, got 'a mix name'"):
        tiny_config(tmp_path, *DATA, "train.stages=[{name: a, steps: 2, data: a mix name}]")
    with pytest.raises(ConfigError, match=r"train.stages\[0\].data.shapes.seq_lenn"):
        tiny_config(tmp_path, *DATA, "train.stages=[{name: a, steps: 2, data: {shapes: {seq_lenn: 16}}}]")
    with pytest.raises(ConfigError, match="microbatches"):
        Trainer(tiny_config(tmp_path, *DATA, "train.steps=2", "train.microbatches=3", "train.batch_size=9"), echo=lambda _: None)
    # Checked against the batch that is used: data.shapes.batch_size (6) here, not the unused train.batch_size (8).
    Trainer(tiny_config(tmp_path, *DATA, "train.steps=2", "train.microbatches=3", "data.shapes.batch_size=6"),
            echo=lambda _: None)


def test_absent_data_mix_fails_fast_and_plans_need_only_shapes(tmp_path, capsys):
    """A recipe names its data by path; an absent one is one line before the model is built, while `plan` needs
    only the shapes, computed for the slice's hosts."""
    missing = tmp_path / "sft.jsonl"
    stages = (f"train.stages=[{{name: a, steps: 1}}, {{name: b, steps: 1, data: {{sources: [{{kind: jsonl, "
              f"name: sft, path: {missing}}}]}}}}]")
    rc = cli_main(["train", "--config", TINY, f"workdir={tmp_path / 'run'}", *DATA, stages])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"train.stages[1].data.sources[0] (jsonl 'sft'): {missing} does not exist" in err
    assert not (tmp_path / "run").exists()  # nothing was built or written

    recipe = os.path.join(os.path.dirname(TINY), "..", "recipes", "llama3v.yaml")
    cfg = load_config(recipe)
    assert not cfg.train.synthetic.enabled and all(s.kind == "jsonl" for s in cfg.data.sources)
    family = get_family(cfg.model)
    stages = resolve_stages(cfg.train)
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(jsonl 'pretrain_pairs'\): .* does not exist"):
        open_train_data(load_config(recipe, [f"data.sources=[{{kind: jsonl, name: pretrain_pairs, "
                                             f"path: {missing}}}]"]), stages, family)
    planned = open_train_data(cfg, stages, family, hosts=8)  # no tokenizer, no data on this machine
    # 32 rows per host of every stage (the preference stages' rows are 16 pairs) x the 8 hosts.
    assert [planned.global_batch(s.index) for s in stages] == [256] * 7
    assert planned.example_batch(0)["input_ids"].shape == (32, 2048)
