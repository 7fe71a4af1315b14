"""Tokenizers, templates, loss masks, image-token expansion, and MllamaProcessor's cross-attention mask."""
import json
import os

import numpy as np
import pytest

from vlm_jax.data import (cross_attention_mask, expand_image_tokens, get_template, load_tokenizer, task_texts,
                          train_sentencepiece)
from vlm_jax.data import tokenizer as tok

WORDS = ["what", "is", "in", "the", "picture", "a", "cat", "dog", "and", "user", "assistant", "system", "\n\n"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|finetune_right_pad_id|>"]


def write_tokenizer_json(path) -> str:
    """A word-level tokenizer.json with Llama 3.2 Vision's special tokens: local, tiny, no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n\n", "isolated"),
                                               pre_tokenizers.WhitespaceSplit()])
    t.add_special_tokens(LLAMA_SPECIALS)
    t.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    return write_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return train_sentencepiece(task_texts() + ["a cat on a mat"] * 3, vocab_size=128, path=str(path)), str(path)


def test_sentencepiece_special_tokens_are_single_ids_and_roundtrip(spm):
    tokenizer, path = spm
    ids = [tokenizer.token_to_id(t) for t in tok.SPECIAL_TOKENS]
    assert ids == list(range(1, len(tok.SPECIAL_TOKENS) + 1))  # after <unk>, in declaration order
    assert tokenizer.vocab_size <= 128
    text = "<|begin_of_text|><|user|><|image|>What digit is this?<|eot|>"
    encoded = tokenizer.encode(text)
    assert encoded[:3] == [tokenizer.bos_id, tokenizer.special_id(tok.USER), tokenizer.image_id]
    assert tokenizer.decode(encoded) == text
    assert tokenizer.encode("123") == [tokenizer.token_to_id(d) for d in "123"]  # digits split
    loaded = load_tokenizer(path)
    assert loaded.encode("How many shapes are there?") == tokenizer.encode("How many shapes are there?")
    assert load_tokenizer(os.path.dirname(path)).vocab_size == tokenizer.vocab_size  # a folder holding spm.model
    assert tokenizer.token_to_id("<|not_a_token|>") is None


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))


def test_hf_tokenizer_json(hf_json):
    t = load_tokenizer(hf_json)
    assert t.image_id == t.token_to_id("<|image|>") and t.pad_id == t.token_to_id("<|finetune_right_pad_id|>")
    ids = t.encode("<|image|>what is in the picture")
    assert ids[0] == t.image_id and len(ids) == 6
    assert t.decode(ids) .replace(" ", "") == "<|image|>whatisinthepicture"


def test_simple_template_loss_mask_on_answers_only(spm):
    tokenizer, _ = spm
    template = get_template("simple", tokenizer)
    turns = [("user", "<image>What digit is this?"), ("assistant", "7"), ("user", "Sure?"), ("assistant", "7")]
    ids, mask = template.encode(turns)
    eot, asst = tokenizer.special_id(tok.EOT), tokenizer.special_id(tok.ASSISTANT)
    assert ids[0] == tokenizer.bos_id and ids[2] == tokenizer.image_id
    supervised = ids[mask]
    seven = tokenizer.token_to_id("7")
    np.testing.assert_array_equal(supervised, [seven, eot, seven, eot])  # answers and their end-of-turn only
    after_header = np.flatnonzero(ids == asst) + 1
    assert mask[after_header].all() and not mask[after_header - 1].any()
    gen, gen_mask = template.encode(turns[:1], add_generation_prompt=True)
    assert gen[-1] == asst and not gen_mask.any()
    ids, mask = template.encode([("user", "Draw it."), ("assistant", "<image>Here.")])
    assert tokenizer.image_id in ids and not mask[ids == tokenizer.image_id].any()  # images are never targets


def test_llama3_vision_template_matches_chat_format(hf_json):
    t = load_tokenizer(hf_json)
    template = get_template("llama3_vision", t)
    ids, mask = template.encode([("user", "<image>what is in the picture"), ("assistant", "a cat")])
    expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>what is in the picture"
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na cat<|eot_id|>")
    assert ids.tolist() == t.encode(expected)
    assert t.decode(ids[mask]).replace(" ", "") == "acat<|eot_id|>"
    assert template.stop_ids == (t.token_to_id("<|eot_id|>"), t.token_to_id("<|end_of_text|>"))


def test_expand_image_tokens_for_unified_models():
    ids = np.array([5, 9, 6, 9, 7])
    mask = np.array([0, 0, 0, 0, 1], bool)
    out, out_mask = expand_image_tokens(ids, mask, 9, [2, 3])
    np.testing.assert_array_equal(out, [5, 9, 9, 6, 9, 9, 9, 7])
    np.testing.assert_array_equal(out_mask, [0, 0, 0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("prompt,num_images", [
    ("<|image|>what is in the picture", 1),
    ("what is <|image|>the picture <|image|>a cat and <|image|>dog", 3),  # text before the first image
    ("<|image|><|image|>what is in <|image|>the picture", 3),  # consecutive leading image tokens
    ("the <|image|><|image|><|image|>cat and <|image|>dog", 4),  # a run of three in the middle
    ("what <|image|>is <|image|><|image|>", 3),  # a run at the very end
])
def test_cross_attention_mask_matches_mllama_processor(hf_json, prompt, num_images):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import MllamaProcessor
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=hf_json, bos_token="<|begin_of_text|>",
                                     pad_token="<|finetune_right_pad_id|>")
    processor = MllamaProcessor(MllamaImageProcessorPil(max_image_tiles=4, size={"height": 28, "width": 28}), hf_tok)
    rng = np.random.default_rng(num_images)
    sizes = [(20, 80), (70, 30), (28, 28), (60, 60)]  # 3, 3, 1 and 4 tiles
    images = [rng.integers(0, 255, size=(*sizes[k % 4], 3), dtype=np.uint8) for k in range(num_images)]
    out = processor(images=[images], text=[prompt], return_tensors="np")
    ids = out["input_ids"][0]
    num_tiles = [int(n) for n in (out["aspect_ratio_mask"][0].sum(-1))]
    ours = cross_attention_mask(ids, load_tokenizer(hf_json).image_id, num_tiles, max_tiles=4)
    np.testing.assert_array_equal(ours, out["cross_attention_mask"][0])
    first_image = int(np.flatnonzero(ids == hf_tok.convert_tokens_to_ids("<|image|>"))[0])
    assert not ours[:first_image].any()  # text before the first image attends to nothing
    assert num_images == 1 or len(set(num_tiles)) > 1  # the images really differ in tile counts


def test_tokenizer_state_rebuilds_it_for_worker_processes(spm, hf_json):
    # Grain hands the tokenizer to worker processes through __getstate__/__setstate__; exercise that
    # protocol directly rather than unpickling.
    for t in (spm[0], load_tokenizer(hf_json)):
        clone = object.__new__(type(t))
        clone.__setstate__(t.__getstate__())
        assert clone.encode("what is in the picture") == t.encode("what is in the picture")
        assert repr(clone) == repr(t)


def test_tokenizer_json_is_valid_json(hf_json):
    with open(hf_json) as f:
        assert "<|image|>" in {t["content"] for t in json.load(f)["added_tokens"]}
