"""A corpus of bad inputs through the real CLI: every case exits 2 with exactly one line on stderr (what, where,
how to fix), no traceback, and leaves every file that existed before byte-identical and no new file behind.

Cases are built from tables below (about 80); a few run as `python -m vlm_jax.cli` processes. Full disks and
read-only folders are simulated in-process (tests run as root here, which chmod does not stop): the local file
writer of etils.epath fails with ENOSPC half-way through a write, or with EACCES when opened.
"""
import errno
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from etils.epath import gpath
from PIL import Image

from vlm_jax import cli
from vlm_jax.convert.safetensors_io import read_dir, write_dir
from vlm_jax.data import EmbeddedSource
from vlm_jax.data.tokenizer import SPECIAL_TOKENS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "models", "tiny_mllama.yaml")


def _wordlevel_tokenizer(path, words: int, specials_first: bool):
    """A tokenizers JSON file of `words` words plus the special tokens (at ids 1.. when `specials_first`)."""
    from tokenizers import Tokenizer, models
    vocab = {"<unk>": 0}
    names = [f"w{i}" for i in range(words)]
    for token in (list(SPECIAL_TOKENS) + names if specials_first else names + list(SPECIAL_TOKENS)):
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_like, hf_mllama_dir):
    """Every input the cases name, keyed by placeholder: {ckpt}, {img}, {bad_png}, ..."""
    root = tmp_path_factory.mktemp("corpus")
    cfg, _, _, _, ckpt = trained_like
    digit = EmbeddedSource("digits_qa", "test")[0]["images"][0]
    Image.fromarray(digit).save(root / "digit.png")
    png = (root / "digit.png").read_bytes()
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    (root / "text.png").write_text("not an image\n")
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (root / "folder.png").mkdir()
    (root / "a_file").write_text("I am a file\n")
    (root / "garbage.model").write_bytes(b"\x00\x01 not sentencepiece")
    (root / "garbage.json").write_text('{"model": ')
    (root / "empty_dir").mkdir()
    _wordlevel_tokenizer(root / "far_image.json", 40, specials_first=False)  # <|image|> id 41, model says 1
    _wordlevel_tokenizer(root / "big.json", 400, specials_first=True)  # ids 1..8 as trained, 409 tokens > rows
    (root / "outputs").mkdir()
    (root / "outputs" / "precious.json").write_text('{"keep": "me"}')
    # configs
    (root / "empty.yaml").write_text("")
    (root / "comments.yaml").write_text("# only a comment\n\n")
    (root / "latin1.yaml").write_bytes("model:\n  family: mllama  # caf\xe9\n".encode("latin-1"))
    (root / "dup_top.yaml").write_text(f"base: {TINY}\nseed: 1\nseed: 2\n")
    (root / "dup_nested.yaml").write_text(f"base: {TINY}\nmodel:\n  text:\n    hidden_size: 64\n    hidden_size: 32\n")
    (root / "no_model.yaml").write_text("seed: 3\n")
    (root / "a_list.yaml").write_text("- model\n- data\n")
    (root / "malformed.yaml").write_text("model: {text: [\n")
    (root / "eval.yaml").write_text("data:\n  eval_sources: [{kind: embedded, name: digits_qa, split: test}]\n")
    (root / "eval_none.yaml").write_text("data:\n  shapes: {batch_size: 4, seq_len: 32, max_images: 1}\n")
    rows = [{"image": name, "conversations": [{"from": "human", "value": "What digit?"}, {"from": "gpt", "value": "7"}]}
            for name in ("truncated.png", "text.png", "empty.png", "noise.jpg")]
    (root / "bad_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval_bad.yaml").write_text(
        f"data:\n  eval_sources: [{{kind: jsonl, name: bad, path: {root / 'bad_images.jsonl'}}}]\n"
        "  max_bad_fraction: 0.5\n  bad_fraction_min_records: 4\n")
    # Hugging Face directories with impossible weights
    tensors = dict(read_dir(hf_mllama_dir[1]))
    key = "language_model.model.layers.0.mlp.down_proj.weight"
    for name, bad in (("hf_nan", np.full_like(tensors[key], np.nan)),
                      ("hf_inf", np.where(np.arange(tensors[key].size).reshape(tensors[key].shape) == 5, np.inf,
                                          tensors[key]).astype(tensors[key].dtype)),
                      ("hf_int", tensors[key].astype(np.int32))):
        write_dir(str(root / name), {**tensors, key: bad})
        (root / name / "config.json").write_bytes((open(os.path.join(hf_mllama_dir[1], "config.json"), "rb").read()))
    places = {name.replace(".", "_"): str(root / name) for name in os.listdir(root)}
    return {**places, "root": str(root), "ckpt": ckpt, "tok": cfg.data.tokenizer, "tiny": TINY,
            "hf": hf_mllama_dir[1], "img": str(root / "digit.png"), "out": str(root / "outputs"),
            "long": " ".join(["how many digits are there"] * 20)}


GEN = ["generate", "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt", "What digit?"]
EVAL = ["eval", "--config", "{eval_yaml}", "--checkpoint", "{ckpt}", "data.tokenizer={tok}"]
TRAIN = ["train", "--config", "{tiny}", "workdir={root}/runs/w", "train.steps=2"]
EXPORT = ["export", "--checkpoint", "{ckpt}", "--to", "hf"]

# (case id, argv, needles of the one line, fault injected into the local file writer)
CASES = [
    # --image files given to generate
    ("image-missing", ["generate", "--checkpoint", "{ckpt}", "--image", "{root}/nope.png", "--prompt", "q"],
     ["--image", "nope.png: no such file"], None),
    ("image-empty", ["generate", "--checkpoint", "{ckpt}", "--image", "{empty_png}", "--prompt", "q"],
     ["empty.png: 0 bytes"], None),
    ("image-truncated", ["generate", "--checkpoint", "{ckpt}", "--image", "{truncated_png}", "--prompt", "q"],
     ["truncated.png: cannot be decoded"], None),
    ("image-text", ["generate", "--checkpoint", "{ckpt}", "--image", "{text_png}", "--prompt", "q"],
     ["text.png: not an image in a format PIL reads"], None),
    ("image-noise", ["generate", "--checkpoint", "{ckpt}", "--image", "{noise_jpg}", "--prompt", "q"],
     ["noise.jpg: not an image"], None),
    ("image-folder", ["generate", "--checkpoint", "{ckpt}", "--image", "{folder_png}", "--prompt", "q"],
     ["folder.png: a directory, not an image file"], None),
    ("image-second-bad", GEN + ["--image", "{text_png}", "--prompt", "q2"], ["text.png: not an image"], None),
    ("image-count", GEN + ["--image", "{img}", "--image", "{img}", "--prompt", "q"], ["3 --image for 2 --prompt"],
     None),
    # prompts
    ("prompt-too-long", ["generate", "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt", "{long}"],
     ["--prompt #1", "data.shapes.seq_len=32", "shorten the prompt"], None),
    ("prompt-second-too-long", GEN + ["--prompt", "{long}"], ["--prompt #2"], None),
    ("prompt-two-image-markers", ["generate", "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt",
                                  "<image><image>what?"], ["--prompt #1", "2 <image> markers, 1 images"], None),
    ("prompt-missing", ["generate", "--checkpoint", "{ckpt}", "--image", "{img}"], ["required: --prompt"], None),
    # sampling and sizes
    *[(f"generate{flag}={value}", GEN + [flag, value], [f"argument {flag}: must be {wanted}, got '{value}'"], None)
      for flag, value, wanted in [
          ("--max-new-tokens", "0", "a positive integer"), ("--max-new-tokens", "-4", "a positive integer"),
          ("--max-new-tokens", "many", "a positive integer"), ("--temperature", "-0.5", "a number >= 0"),
          ("--temperature", "nan", "a number >= 0"), ("--temperature", "inf", "a number >= 0"),
          ("--top-p", "0", "a number in (0, 1]"), ("--top-p", "1.5", "a number in (0, 1]"),
          ("--top-p", "-0.1", "a number in (0, 1]"), ("--top-k", "-1", "an integer >= 0"),
          ("--top-k", "2.5", "an integer >= 0")]],
    *[(f"eval{flag}={value}", EVAL + [flag, value], [f"argument {flag}: must be {wanted}, got '{value}'"], None)
      for flag, value, wanted in [
          ("--batch-size", "0", "a positive integer"), ("--batch-size", "-2", "a positive integer"),
          ("--limit", "-1", "an integer >= 0"), ("--max-new-tokens", "0", "a positive integer")]],
    ("plan--mfu=0", ["plan", "--config", "{tiny}", "--topology", "v5p-8", "--mfu", "0"],
     ["argument --mfu: must be a number in (0, 1]"], None),
    ("generate-unknown-flag", GEN + ["--beam", "4"], ["unrecognized arguments: --beam 4"], None),
    # tokenizers
    *[(f"{cmd[0]}-tokenizer-{name}", cmd + ["--tokenizer", path], needles, None)
      for cmd in (GEN, EVAL[:5])
      for name, path, needles in [
          ("garbage-model", "{garbage_model}", ["garbage.model is not a sentencepiece model"]),
          ("garbage-json", "{garbage_json}", ["garbage.json is not a tokenizers JSON file"]),
          ("missing", "{root}/nope.model", ["no tokenizer found", "nope.model", "pass --tokenizer PATH"]),
          ("folder", "{empty_dir}", ["no tokenizer.json or tokenizer.model in", "empty_dir"]),
          ("image-id", "{far_image_json}", ["model.image_token_index (1) must equal the <|image|> id (41)"]),
          ("vocab", "{big_json}", ["has 409 tokens, more than the model's 136 embedding rows"])]],
    ("train-tokenizer-garbage", TRAIN + ["data.tokenizer={garbage_model}",
                                            "data.sources=[{{kind: embedded, name: digits_qa}}]"],
     ["data.tokenizer:", "is not a sentencepiece model"], None),
    ("train-tokenizer-image-id", TRAIN + ["data.tokenizer={far_image_json}",
                                             "data.sources=[{{kind: embedded, name: digits_qa}}]"],
     ["model.image_token_index (128) must equal the <|image|> id (41)"], None),
    ("export-tokenizer-garbage", EXPORT + ["--out", "{root}/exp_t", "--tokenizer", "{garbage_json}"],
     ["not a tokenizers JSON file"], None),
    # checkpoints
    ("generate-checkpoint-missing", ["generate", "--checkpoint", "{root}/nockpt", "--image", "{img}", "--prompt", "q"],
     ["checkpoint directory not found"], None),
    ("generate-checkpoint-file", ["generate", "--checkpoint", "{a_file}", "--image", "{img}", "--prompt", "q"],
     ["a_file: checkpoint directory not found"], None),
    ("eval-checkpoint-missing", EVAL[:3] + ["--checkpoint", "{root}/nockpt", "data.tokenizer={tok}"],
     ["checkpoint directory not found"], None),
    # outputs
    ("generate-json-under-file", GEN + ["--json", "{a_file}/answers.json"], ["--json:", "a_file is a file"], None),
    ("generate-json-is-folder", GEN + ["--json", "{out}"], ["--json:", "is a directory; give a file path"], None),
    ("eval-json-under-file", EVAL + ["--json", "{a_file}/x/eval.json"], ["--json:", "a_file is a file"], None),
    ("plan-json-under-file", ["plan", "--config", "{tiny}", "--topology", "v5p-8", "--json", "{a_file}/p.json"],
     ["--json:", "a_file is a file"], None),
    ("export-out-under-file", EXPORT + ["--out", "{a_file}/hf"], ["--out:", "a_file is a file"], None),
    ("export-out-not-empty", EXPORT + ["--out", "{out}"], ["output directory is not empty"], None),
    ("export-out-is-file", EXPORT + ["--out", "{a_file}"], ["output directory is not empty"], None),
    ("export-dtype", EXPORT + ["--out", "{root}/exp_d", "--dtype", "int8"], ["export dtype 'int8'"], None),
    ("export-to", ["export", "--checkpoint", "{ckpt}", "--to", "onnx", "--out", "{root}/exp_o"], ["only 'hf'"], None),
    ("export-full-disk", EXPORT + ["--out", "{root}/exp_full"], ["no space left on the device", "exp_full"], "enospc"),
    ("export-read-only", EXPORT + ["--out", "{root}/exp_ro"], ["exp_ro", "permission denied"], "eacces"),
    ("import-out-under-file", ["import", "--hf", "{hf}", "--out", "{a_file}/ckpt"], ["--out:", "a_file is a file"],
     None),
    ("import-out-not-empty", ["import", "--hf", "{hf}", "--out", "{out}"], ["output directory is not empty"], None),
    ("train-workdir-is-file", TRAIN[:3] + ["workdir={a_file}", "train.synthetic.enabled=true"],
     ["workdir:", "a_file is a file"], None),
    ("train-workdir-under-file", TRAIN[:3] + ["workdir={a_file}/run", "train.synthetic.enabled=true"],
     ["workdir:", "cannot be created because", "a_file is a file"], None),
    # weights
    ("import-nan", ["import", "--hf", "{hf_nan}", "--out", "{root}/imp_nan"],
     ["'language_model.model.layers.0.mlp.down_proj.weight' holds", "NaN/Inf values"], None),
    ("import-one-inf", ["import", "--hf", "{hf_inf}", "--out", "{root}/imp_inf"],
     ["down_proj.weight' holds 1 NaN/Inf values"], None),
    ("import-int", ["import", "--hf", "{hf_int}", "--out", "{root}/imp_int"],
     ["down_proj.weight' has the integer dtype int32"], None),
    # data
    ("eval-no-sources", EVAL[:2] + ["{eval_none_yaml}"] + EVAL[3:], ["data.eval_sources is empty"], None),
    ("eval-bad-images", EVAL[:2] + ["{eval_bad_yaml}"] + EVAL[3:],
     ["4 of 4 input records were unusable", "data.max_bad_fraction"], None),
    ("train-no-data", TRAIN, ["data.sources"], None),
]
# YAML files, through every command that reads one
for _name, _needles in [("empty.yaml", ["the config file is empty"]), ("comments.yaml", ["the config file is empty"]),
                        ("latin1.yaml", ["not UTF-8 text (byte", "save the config as UTF-8"]),
                        ("dup_top.yaml", ["line 3", "duplicate key 'seed'"]),
                        ("dup_nested.yaml", ["line 5", "duplicate key 'hidden_size'"]),
                        ("a_list.yaml", ["top level must be a mapping"]), ("malformed.yaml", ["malformed YAML"])]:
    _config = "{" + _name.replace(".", "_") + "}"
    CASES += [(f"info-{_name}", ["info", "--config", _config], _needles, None),
              (f"train-{_name}", ["train", "--config", _config, "workdir={root}/runs/y"], _needles, None),
              (f"eval-{_name}", EVAL[:2] + [_config] + EVAL[3:], _needles, None)]
CASES += [(f"{cmd}-no-model", [cmd, "--config", "{no_model_yaml}", *extra], ["no `model:` section", "base:"], None)
          for cmd, extra in [("info", []), ("train", ["workdir={root}/runs/z"]), ("plan", ["--topology", "v5p-8"])]]
# A few through a real process: no traceback, one line, exit 2.
SUBPROCESS = {"image-truncated", "train-dup_nested.yaml", "import-int", "generate--top-p=1.5"}


def _snapshot(root) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def _inject(monkeypatch, fault):
    """The local writer of etils.epath fails: ENOSPC after half of a write, or EACCES when a file is opened to write."""
    real_open = gpath.PosixGPath.open

    class HalfFull:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def faulty_open(self, mode="r", **kwargs):
        if not any(c in mode for c in "wax"):
            return real_open(self, mode, **kwargs)
        if fault == "eacces":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return HalfFull(real_open(self, mode, **kwargs))

    monkeypatch.setattr(gpath.PosixGPath, "open", faulty_open)


def test_corpus_is_large():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, capsys, monkeypatch):
    name, argv, needles, fault = case
    argv = [a.format(**world) for a in argv]
    before = _snapshot(world["root"]) | _snapshot(os.path.dirname(world["ckpt"]))
    if name in SUBPROCESS:
        proc = subprocess.run([sys.executable, "-m", "vlm_jax.cli", *argv], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO})
        rc, err = proc.returncode, proc.stderr
    else:
        if fault:
            _inject(monkeypatch, fault)
        rc = cli.main(argv)
        err = capsys.readouterr().err
        monkeypatch.undo()
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith((f"vlm-jax {argv[0]}: error: ", "vlm-jax: error: unrecognized arguments")), err
    for needle in needles:
        assert needle.format(**world) in err, (needle, err)
    after = _snapshot(world["root"]) | _snapshot(os.path.dirname(world["ckpt"]))
    assert {p: after.get(p) for p in before} == before, "an existing file changed"
    assert not set(after) - set(before), f"left behind: {sorted(set(after) - set(before))}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the cases above simulate it")
@pytest.mark.parametrize("argv", [GEN + ["--json", "{ro}/answers.json"], TRAIN[:3] + ["workdir={ro}/run"],
                                  EXPORT + ["--out", "{ro}/hf"]])
def test_read_only_folder_is_refused_before_any_work(argv, world, tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    assert cli.main([a.format(ro=read_only, **world) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{read_only} is not writable" in err, err
    assert not list(read_only.iterdir())
