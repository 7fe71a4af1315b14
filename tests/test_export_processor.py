"""`vlm-jax export` writes a complete Hugging Face model repo: transformers alone (AutoProcessor, its chat
template, plain `model.generate` with no stop ids) answers exactly as `vlm-jax generate` does; the LLaVA export's
processor prepares exactly our prompt ids and pixels; token ids come from the tokenizer, at export and at train
start."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from train_helpers import ROOT, TINY
from vlm_jax.cli import main as cli_main
from vlm_jax.config import Config, load_config
from vlm_jax.data import EmbeddedSource, ExamplePreparer, get_template, task_texts, train_sentencepiece
from vlm_jax.families import build_model, get_family, init_params
from vlm_jax.infer.answer import Answerer
from vlm_jax.paths import WRITING_MARKER
from vlm_jax.train import checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_LLAVA = f"{ROOT}/configs/models/tiny_llava.yaml"
QUESTIONS = [("digits_qa", 0), ("shapes_color", 1), ("chart_count", 2)]


def _trained_like(root, config, overrides, seed):
    """A tiny random model with a tokenizer trained on the embedded tasks, saved as a checkpoint with that
    tokenizer and the data settings in its config."""
    tokenizer_path = str(root / "tokenizer.model")
    tokenizer = train_sentencepiece(task_texts(), vocab_size=128, path=tokenizer_path)
    cfg = load_config(config, [f"data.tokenizer={tokenizer_path}", *overrides])
    model = build_model(cfg.model)
    params = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(init_params(model, jax.random.PRNGKey(seed)))))
    return cfg, model, params, tokenizer


def _save(root, cfg, params):
    ckpt = str(root / "ckpt")
    checkpoint.save_params(ckpt, params, Config(model=cfg.model, data=cfg.data))
    return ckpt


def _question(task, i):
    record = EmbeddedSource(task, "test")[i]
    return record["images"][0], record["turns"][0][1].replace("<image>", "").strip()


def _messages(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def mllama_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_mllama")
    cfg, model, params, tokenizer = _trained_like(
        root, TINY, ["data.shapes={batch_size: 1, seq_len: 32, max_images: 1}",
                     "model.text.cross_attention_gate_init=0.8", "model.image_token_index=1"], seed=3)
    # Answers end on their own within a few tokens: the <|eot|> and the most generated token swap lm_head columns.
    answerer = Answerer(model, params, tokenizer, cfg.data, batch_size=1, max_new_tokens=8)
    first = np.concatenate([answerer.generate_tokens([_record(*_question(*q))])[0] for q in QUESTIONS])
    common = np.bincount(first.ravel()).argmax()
    eot = answerer.template.end_of_turn()[-1]
    kernel = np.array(params["text"]["lm_head"]["kernel"])
    kernel[:, [common, eot]] = kernel[:, [eot, common]]
    params["text"]["lm_head"]["kernel"] = kernel
    ckpt = _save(root, cfg, params)
    out = str(root / "hf")
    assert cli_main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", out]) == 0
    return cfg, model, params, tokenizer, out


def _record(image, question):
    return {"images": [image], "turns": [("user", "<image>" + question)]}


def test_mllama_export_generates_with_transformers_alone_as_vlm_jax_does(mllama_export):
    cfg, model, params, tokenizer, out = mllama_export
    processor = transformers.AutoProcessor.from_pretrained(out)
    hf_model = transformers.MllamaForConditionalGeneration.from_pretrained(out).eval()
    answerer = Answerer(model, params, tokenizer, cfg.data, batch_size=1, max_new_tokens=12)
    template = get_template(cfg.data.template, tokenizer)
    stopped_early = 0
    for task, i in QUESTIONS:
        image, question = _question(task, i)
        text = processor.apply_chat_template(_messages(question), add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        ours_prompt = template.encode([("user", "<image>" + question)], add_generation_prompt=True)[0]
        assert inputs["input_ids"][0].tolist() == ours_prompt.tolist()
        ours_pixels = answerer.prompts([_record(image, question)])[0]["pixel_values"][0]
        np.testing.assert_allclose(inputs["pixel_values"][0].numpy(), ours_pixels, atol=1e-5)

        with torch.no_grad():  # no stop ids, no pad id: the export's generation_config.json alone
            generated = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)
        theirs = generated[0, inputs["input_ids"].shape[1]:].tolist()
        ours = answerer.generate_tokens([_record(image, question)])[0][0].tolist()
        stops = [k for k, t in enumerate(ours) if t in template.stop_ids]
        expected = ours[:stops[0] + 1] if stops else ours
        assert theirs == expected, (task, i, theirs, ours)
        stopped_early += bool(stops)
        answer = processor.decode(theirs, skip_special_tokens=True).strip()
        assert answer == answerer.decode(np.asarray([ours]))[0]
    assert stopped_early >= 2  # plain generate really stopped on the tokenizer's end-of-turn


def test_export_ids_come_from_the_tokenizer(mllama_export):
    _, _, _, tokenizer, out = mllama_export
    config = json.load(open(f"{out}/config.json"))
    generation = json.load(open(f"{out}/generation_config.json"))
    eot = tokenizer.token_to_id("<|eot|>")
    assert config["image_token_index"] == tokenizer.image_id
    assert config["text_config"]["bos_token_id"] == generation["bos_token_id"] == tokenizer.bos_id
    assert config["text_config"]["pad_token_id"] == generation["pad_token_id"] == tokenizer.pad_id
    assert config["text_config"]["eos_token_id"] == generation["eos_token_id"] == [eot, tokenizer.eos_id]
    preprocessor = json.load(open(f"{out}/preprocessor_config.json"))
    assert preprocessor["size"] == {"height": 28, "width": 28} and preprocessor["max_image_tiles"] == 4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    for text in list(task_texts())[:200]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_export_replaces_config_ids_that_disagree_with_the_tokenizer(tmp_path, capsys):
    """An old checkpoint whose config says eos=2 (<|begin_of_text|>) exports the tokenizer's ids, and says so."""
    cfg, _, params, _ = _trained_like(tmp_path, TINY, ["model.image_token_index=1", "model.text.eos_token_id=[2]",
                                                       "model.text.bos_token_id=1", "model.text.pad_token_id=0"], 0)
    ckpt = _save(tmp_path, cfg, params)
    assert cli_main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "model.text.eos_token_id: (2,) -> (7, 3)" in out and "model.text.bos_token_id: 1 -> 2" in out
    assert json.load(open(tmp_path / "hf" / "generation_config.json"))["eos_token_id"] == [7, 3]


def test_llava_export_processor_prepares_our_ids_and_pixels(tmp_path):
    """vlm-jax does not generate for LLaVA yet: the round trip is the processor's (template, tokenizer, image
    token expansion, pixels) against our pipeline's prompt."""
    cfg, model, params, tokenizer = _trained_like(
        tmp_path, TINY_LLAVA, ["model.image_token_index=1", "data.image={op: resize}",
                               "data.shapes={batch_size: 1, seq_len: 64, max_images: 1}"], seed=0)
    ckpt = _save(tmp_path, cfg, params)
    out = str(tmp_path / "hf")
    assert cli_main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", out]) == 0
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaProcessor"
    family = get_family(cfg.model)
    preparer = ExamplePreparer(family.input_spec(cfg.model), get_template("simple", tokenizer), cfg.data.image,
                               cfg.data.shapes)
    for task, i in QUESTIONS:
        image, question = _question(task, i)
        text = processor.apply_chat_template(_messages(question), add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="np")
        ours, _ = preparer.prompt(_record(image, question))
        assert inputs["input_ids"][0].tolist() == ours["tokens"].tolist()
        np.testing.assert_allclose(inputs["pixel_values"][0], ours["images"][0][0], atol=1e-5)
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    assert hf_model.config.image_token_index == tokenizer.image_id
    assert list(hf_model.generation_config.eos_token_id) == [7, 3]


def test_train_start_rejects_config_ids_that_disagree_with_the_tokenizer(tmp_path):
    from vlm_jax.errors import ConfigError
    from vlm_jax.train.data.pipeline import PipelineData
    from vlm_jax.train.recipe import resolve_stages
    tokenizer_path = str(tmp_path / "tokenizer.model")
    train_sentencepiece(task_texts(), vocab_size=128, path=tokenizer_path)
    cfg = load_config(TINY, [f"workdir={tmp_path}", f"data.tokenizer={tokenizer_path}", "model.image_token_index=1",
                             "data.sources=[{kind: embedded, name: digits_qa}]", "model.text.eos_token_id=[2]",
                             "train.steps=10"])
    family = get_family(cfg.model)
    with pytest.raises(ConfigError, match=r"^model.text.eos_token_id \(\[2\]\) must contain the tokenizer's eos id "
                                          r"\(3, .*\); set model.text.eos_token_id=\[3\]$"):
        PipelineData(cfg, resolve_stages(cfg.train), family, echo=lambda *_: None)


def test_import_keeps_the_processor_files_and_export_copies_them_back(mllama_export, tmp_path):
    out = mllama_export[-1]
    assert cli_main(["import", "--hf", out, "--out", str(tmp_path / "ckpt")]) == 0
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--to", "hf",
                     "--out", str(tmp_path / "hf")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                 "preprocessor_config.json", "processor_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == open(f"{out}/{name}", "rb").read(), name
    generation = json.load(open(tmp_path / "hf" / "generation_config.json"))
    assert generation == json.load(open(f"{out}/generation_config.json"))


# `vlm-jax export` in a process that SIGKILLs itself once the weights file holds its first tensor.
_EXPORT_KILLED_MID_WEIGHTS = """
import os, signal, sys
from vlm_jax.cli import main
from vlm_jax.convert import safetensors_io

write_file = safetensors_io._write_file

def write_one_tensor_then_die(path, shard, tensors):
    def first_then_kill():
        yield next(tensors)
        os.kill(os.getpid(), signal.SIGKILL)
    write_file(path, shard, first_then_kill())

safetensors_io._write_file = write_one_tensor_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_export_is_replaced_by_the_next_into_the_same_out(mllama_export, tmp_path, capsys):
    """A SIGKILL cannot be cleaned up after: the next export into that --out finds the marker the killed one left
    and writes the whole export; an --out holding anything else is still refused."""
    whole = pathlib.Path(mllama_export[-1])
    argv = ["export", "--checkpoint", str(whole.parent / "ckpt"), "--to", "hf", "--out", str(tmp_path / "hf")]
    proc = subprocess.run([sys.executable, "-c", _EXPORT_KILLED_MID_WEIGHTS, *argv], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {WRITING_MARKER, "model.safetensors.tmp"} <= left and "model.safetensors" not in left, left
    assert cli_main(argv) == 0
    assert "removed the partial output a killed run left there" in capsys.readouterr().err
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == sorted(p.name for p in whole.iterdir()) and WRITING_MARKER not in files
    for name in files:
        assert (tmp_path / "hf" / name).read_bytes() == (whole / name).read_bytes(), name
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.safetensors.tmp").write_bytes(b"someone else's")
    assert cli_main([*argv[:-1], str(tmp_path / "mine")]) == 2
    assert "output directory is not empty" in capsys.readouterr().err
