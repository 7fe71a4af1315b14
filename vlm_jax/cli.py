"""`vlm-jax <command>`: every command validates its inputs first; user mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from vlm_jax import host_memory

# Environment failures on a user's path: one line naming the path, not a traceback (any other OSError is a bug).
_ENVIRONMENT_ERRORS = {
    errno.EACCES: "permission denied; fix its permissions or choose another path",
    errno.EPERM: "operation not permitted; fix its permissions or choose another path",
    errno.EROFS: "read-only file system; choose another path",
    errno.ENOSPC: "no space left on the device; free space or choose another path",
    errno.EDQUOT: "disk quota exceeded; free space or choose another path",
    errno.EISDIR: "is a directory; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EEXIST: "already exists; choose another path",
}


def _model_config(args):
    from vlm_jax.config import load_config
    if args.hf:
        from vlm_jax.convert import config_from_hf
        return config_from_hf(args.hf)
    return load_config(args.config, args.overrides, require=("model",)).model


def cmd_info(args):
    from vlm_jax.convert import parameter_counts
    counts = parameter_counts(_model_config(args))
    width = max(map(len, counts))
    for label, n in counts.items():
        print(f"{label:<{width}}  {n:>16,}")


def _empty_out(out: str):
    """--out as a path that holds nothing yet (nothing is ever overwritten, but the partial output of a killed
    command of ours is replaced)."""
    from vlm_jax.paths import check_writable, clear_killed_write, is_nonempty, user_path
    path = user_path(out, "--out")
    if clear_killed_write(path):
        print(f"{out}: removed the partial output a killed run left there; writing it again", file=sys.stderr)
    if is_nonempty(path):
        raise_user(f"{out}: output directory is not empty; choose a new --out (nothing is overwritten)")
    check_writable(path, "--out", folder=True)
    return path


def _json_out(value: str):
    """--json as a writable file path, checked before any work; None when not asked for."""
    from vlm_jax.paths import check_writable, user_path
    if not value:
        return None
    path = user_path(value, "--json")
    check_writable(path, "--json")
    return path


def cmd_import(args):
    from vlm_jax.config import Config, apply_overrides
    from vlm_jax.convert import from_hf, import_notes, read_hf_config
    from vlm_jax.convert.processor import keep_processor_files
    from vlm_jax.paths import writing_folder
    from vlm_jax.train import checkpoint
    out = _empty_out(args.out)
    model, params = from_hf(args.hf, **apply_overrides({}, args.set or []))
    with writing_folder(out):
        checkpoint.save_params(out, params, Config(model=model.config), hf_config=read_hf_config(args.hf))
        kept = keep_processor_files(args.hf, out)  # export copies them back
    for note in import_notes(model.config):
        print(f"note: {note}")
    print(f"imported {args.hf} -> {out} (step 0)" + (f"; kept {', '.join(kept)}" if kept else ""))


def _size(text: str, flag: str) -> int:
    """Bytes from '5GB', '512MiB' or a plain count (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024, as
    in transformers' max_shard_size)."""
    import re
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B)?", text.strip(), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise_user(f"{flag} {text}: expected a positive size such as 5GB, 512MiB or 1000000 (bytes)")
    power = "KMGT".index(match[2].upper()) + 1 if match[2] else 0
    return int(float(match[1]) * (1024 if match[3] else 1000) ** power)


def cmd_export(args):
    from vlm_jax.convert import export_config, to_hf
    from vlm_jax.convert.processor import copy_processor_files, export_repo, has_processor, kept_processor_dir
    from vlm_jax.data import load_tokenizer
    from vlm_jax.families import build_model
    from vlm_jax.infer.answer import tokenizer_path
    from vlm_jax.paths import user_path, write_atomic, writing_folder
    from vlm_jax.train import checkpoint
    if args.to != "hf":
        raise_user(f"--to {args.to}: only 'hf' is supported")
    max_shard_bytes = _size(args.max_shard_size, "--max-shard-size")
    out = _empty_out(args.out)
    config, hf_config, step = checkpoint.read_meta(args.checkpoint)
    convention = args.vision_layer_convention or None
    export_config(config.model, convention)  # its mistakes before the slow restore
    kept = None if args.tokenizer else kept_processor_dir(args.checkpoint)
    tokenizer_file, looked_at = tokenizer_path(config, args.checkpoint, args.tokenizer)
    # Parameters are read one at a time as they are written; a failed export takes its partial files away.
    with writing_folder(out), checkpoint.lazy_params(args.checkpoint) as params:
        if kept:  # an imported checkpoint: its own tokenizer, template and processor, and its config's ids
            notes = to_hf(build_model(config.model), params, out, dtype=args.dtype, hf_config_base=hf_config,
                          max_shard_bytes=max_shard_bytes, vision_layer_convention=convention)
            copy_processor_files(kept, out)
            tokenizer_file = kept
        elif tokenizer_file and has_processor(config.model):
            changes, notes = export_repo(config.model, config.data, params, out, load_tokenizer(tokenizer_file),
                                         args.dtype, hf_config, convention, max_shard_bytes)
            for change in changes:
                print(f"note: {change} (the checkpoint's config disagrees with its tokenizer; the export has the "
                      "tokenizer's ids)")
            original = user_path(tokenizer_file, "tokenizer")
            if original.is_file() and original.suffix == ".model":  # the sentencepiece original
                write_atomic(out / "tokenizer.model", original.read_bytes())
        else:
            why = (f"no tokenizer found (looked at {', '.join(looked_at)}; pass --tokenizer PATH)"
                   if not tokenizer_file
                   else f"model.family '{config.model.family}' has no Hugging Face processor description")
            print(f"WARNING: {why}: exporting weights, config.json and generation_config.json only, with the "
                  "config's token ids", file=sys.stderr)
            tokenizer_file = None
            notes = to_hf(build_model(config.model), params, out, dtype=args.dtype, hf_config_base=hf_config,
                          max_shard_bytes=max_shard_bytes, vision_layer_convention=convention)
    for note in notes:
        print(f"note: {note}")
    print(f"exported step {step} of {args.checkpoint} -> {out}"
          + (f" (with the processor from {tokenizer_file})" if tokenizer_file else ""))


def cmd_train(args):
    from vlm_jax import distributed
    from vlm_jax.config import load_config
    from vlm_jax.paths import user_path
    cfg = load_config(args.config, args.overrides, require=("model",))
    from vlm_jax.recipe import run_recipe  # slow to import: after the config is known to be good
    distributed.initialize(cfg.distributed)  # before any device is touched; a no-op for one process
    print(distributed.check_processes(cfg.distributed))
    result = run_recipe(cfg)
    if not result.stopped_by_signal:
        print(f"finished at step {int(result.state.step)}; checkpoints in {user_path(cfg.workdir, 'workdir') / 'checkpoints'}")


def _eval_config(path: str, overrides: list[str],
                 fix: str = "list the held-out sources to evaluate (e.g. data.eval_sources='[{kind: embedded, "
                            "name: digits_qa, split: test}]')"):
    """A config whose data.eval_sources are the records to evaluate (or score)."""
    from vlm_jax.config import load_config
    cfg = load_config(path, overrides)
    if not cfg.data.eval_sources:
        raise_user(f"{path}: data.eval_sources is empty; {fix}")
    return cfg


def cmd_eval(args):
    import json

    from vlm_jax.infer.answer import load_answerer
    from vlm_jax.infer.evaluate import evaluate_sources, results_table
    from vlm_jax.paths import write_atomic
    cfg = _eval_config(args.config, args.overrides)
    out = _json_out(args.json)
    answerer = load_answerer(args.checkpoint, args.tokenizer or cfg.data.tokenizer, cfg.data,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    results = evaluate_sources(answerer, cfg.data.eval_sources, args.limit)
    print(results_table(results))
    if out:
        write_atomic(out, json.dumps([r.row() for r in results], indent=2))


def cmd_soup(args):
    import json

    from vlm_jax.infer.soup import check_method, soup_checkpoints, soup_row, soup_table, write_soup
    from vlm_jax.paths import write_atomic, writing_folder
    check_method(args.method, bool(args.eval_config))
    cfg = _eval_config(args.eval_config, args.overrides) if args.eval_config else None
    out, json_out = _empty_out(args.out), _json_out(args.json)
    soup = soup_checkpoints(args.checkpoints, args.method, cfg.data if cfg else None, args.limit, args.tokenizer,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    with writing_folder(out):
        write_soup(out, soup.params, args.checkpoints[soup.source])
    print(soup_table(args.checkpoints, args.method, soup))
    if json_out:
        write_atomic(json_out, json.dumps(soup_row(args.checkpoints, args.method, soup), indent=2))
    print(f"{args.method} soup of {sum(soup.kept)} of {len(soup.kept)} checkpoints -> {out}")


def cmd_score(args):
    import json

    from vlm_jax.config import SourceConfig
    from vlm_jax.infer.score import load_scorer, results_table
    from vlm_jax.paths import user_path, write_atomic
    data = sources = None
    if args.config:
        data = _eval_config(args.config, args.overrides,
                            "list the preference or SFT records to score (or pass --jsonl FILE)").data
        sources = data.eval_sources
    elif args.overrides:
        raise_user(f"overrides {' '.join(args.overrides)} need --config; with --jsonl the run's own data settings apply")
    else:
        path = user_path(args.jsonl, "--jsonl")
        if not path.is_file():
            raise_user(f"--jsonl {args.jsonl}: no such file; give a JSONL file of preference or SFT records")
        sources = (SourceConfig(kind="jsonl", name=path.stem, path=args.jsonl, split="score"),)
    out = _json_out(args.json)
    scorer = load_scorer(args.checkpoint, args.tokenizer or (data.tokenizer if data else ""), data,
                         batch_size=args.batch_size)
    results = scorer.score_sources(sources, args.limit)
    print(results_table(results))
    if out:
        write_atomic(out, json.dumps([{**r.row(), "scores": r.records} for r in results], indent=2))


def cmd_sample(args):
    import json

    from vlm_jax.infer.answer import load_answerer
    from vlm_jax.infer.generate import Sampling
    from vlm_jax.infer.sample import DATA_FILE, PAIRS_FILE, judge, results_table, sample_sources, write_dataset
    from vlm_jax.paths import write_atomic, writing_folder
    if args.num_samples > 1 and args.temperature == 0:
        raise_user(f"--num-samples {args.num_samples} at --temperature 0 draws the same greedy answer each time; "
                   "give --temperature > 0 (e.g. 0.7)")
    if args.verifier and args.threshold is not None:
        raise_user(f"--threshold applies to --reward-checkpoint scores; --verifier {args.verifier} keeps the "
                   "correct answers")
    cfg = _eval_config(args.config, args.overrides, "list the prompts (SFT records with reference answers) to "
                                                    "sample answers to")
    out, json_out = _empty_out(args.out), _json_out(args.json)
    tokenizer = args.tokenizer or cfg.data.tokenizer
    answerer = load_answerer(args.checkpoint, tokenizer, cfg.data, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens,
                             sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
    score, threshold = judge(args.verifier, args.reward_checkpoint, args.threshold, cfg.data.tokenizer, cfg.data,
                             args.batch_size)
    results = sample_sources(answerer, cfg.data.eval_sources, args.limit, score, threshold, args.num_samples,
                             args.seed)
    with writing_folder(out):
        written = write_dataset(out, results)
    print(results_table(results))
    if json_out:
        write_atomic(json_out, json.dumps([r.row() for r in results], indent=2))
    print(f"kept {written} of {sum(r.prompts for r in results)} prompts -> {out / DATA_FILE}; "
          f"{sum(r.pairs for r in results)} preference pairs -> {out / PAIRS_FILE}")


def _check_image(path: str):
    """One line naming `path` and what is wrong, unless it decodes as an image (the data pipeline's decoder)."""
    from vlm_jax.data.bad_records import BadRecord
    from vlm_jax.data.images import decode_image
    try:
        decode_image(path)
    except BadRecord as e:
        raise_user(f"--image {e.detail}; give a PNG, JPEG or other image file")


def _field(text: str) -> str:
    """One tab-separated output field: backslash, tab and newline escaped so a record stays one line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def cmd_generate(args):
    import json

    import jax

    from vlm_jax.data.bad_records import BadRecord
    from vlm_jax.infer.answer import load_answerer
    from vlm_jax.infer.generate import Sampling
    from vlm_jax.paths import write_atomic
    images = args.image * len(args.prompt) if len(args.image) == 1 else args.image
    if len(images) != len(args.prompt):
        raise_user(f"{len(args.image)} --image for {len(args.prompt)} --prompt; give one image per prompt, "
                   "or one image for all")
    for path in dict.fromkeys(images):
        _check_image(path)
    out = _json_out(args.json)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    answerer = load_answerer(args.checkpoint, args.tokenizer, batch_size=len(args.prompt),
                             max_new_tokens=args.max_new_tokens, sampling=sampling)
    records = [{"images": [path], "turns": [("user", prompt)]} for path, prompt in zip(images, args.prompt)]
    for i, record in enumerate(records):
        try:
            answerer.preparer.prompt(record)
        except BadRecord as e:
            fix = ("shorten the prompt (the checkpoint's data.shapes.seq_len bounds prompt and image tokens)"
                   if e.reason == "too_long" else "fix the prompt")
            raise_user(f"--prompt #{i + 1} with --image {images[i]}: {e.detail or e.reason}; {fix}")
    rows = [{"image": path, "prompt": prompt, "answer": answer} for path, prompt, answer
            in zip(images, args.prompt, answerer.answer(records, jax.random.PRNGKey(args.seed)))]
    for row in rows:
        print("\t".join(_field(row[k]) for k in ("image", "prompt", "answer")))
    if out:
        write_atomic(out, json.dumps(rows, indent=2, ensure_ascii=False))


def cmd_plan(args):
    # Compile targets come from libtpu's topology description; the host backend stays the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from vlm_jax.config import load_config
    from vlm_jax.paths import write_atomic
    from vlm_jax.plan import advice, plan
    cfg = load_config(args.config, args.overrides, require=("model",))
    out = _json_out(args.json)
    reports = plan(cfg, args.topology, args.mfu, tuple(args.stage or ()))
    if out:
        import json
        write_atomic(out, json.dumps({"topology": args.topology, "stages": [r.as_dict() for r in reports]},
                                     indent=2))
    misfits = [r.stage for r in reports if not r.fits]
    if misfits:
        raise_user(f"stage(s) {', '.join(misfits)} do not fit on {args.topology}; try {advice(cfg)}")


def raise_user(message: str):
    from vlm_jax.errors import UserError
    raise UserError(message)


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes in the CLI's form: one line on stderr (no usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, ok, wanted: str):
    """An argparse type: `kind(text)` that satisfies `ok`, else a one-line message saying what is `wanted`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {wanted}, got '{text}'")
        return value
    return parse


_POSITIVE = _number(int, lambda v: v > 0, "a positive integer")
_COUNT = _number(int, lambda v: v >= 0, "an integer >= 0")
_FRACTION = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _batch_args(p, unit: str, max_new_tokens: int | None, batch_help: str | None = None):
    """--limit, --batch-size and (for commands that generate) --max-new-tokens."""
    p.add_argument("--limit", type=_COUNT, default=0, help=f"{unit} per source (0 = all)")
    p.add_argument("--batch-size", type=_POSITIVE, default=32, help=batch_help)
    if max_new_tokens:
        p.add_argument("--max-new-tokens", type=_POSITIVE, default=max_new_tokens)


def _sampling_args(p, temperature: float):
    p.add_argument("--temperature", type=_number(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=_COUNT, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=_FRACTION, default=1.0, help="1 = no nucleus cut")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlm-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts per component, computed without allocating")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a YAML config (model section)")
    src.add_argument("--hf", help="a Hugging Face model directory")
    info.add_argument("overrides", nargs="*", help="dotted.key=value overrides for --config")
    info.set_defaults(func=cmd_info)

    imp = sub.add_parser("import", help="Hugging Face directory -> vlm_jax (Orbax) checkpoint")
    imp.add_argument("--hf", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--set", nargs="*", metavar="FIELD=VALUE",
                     help="model config fields to set, e.g. dtype=float32 scan_layers=false "
                          "vision.intermediate_layers_convention=output")
    imp.set_defaults(func=cmd_import)

    exp = sub.add_parser("export", help="vlm_jax checkpoint -> Hugging Face directory")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--to", default="hf")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    exp.add_argument("--vision-layer-convention", default="",
                     help="Mllama: whose reading of vision_config.intermediate_layers_indices config.json is written "
                          "for: 'output' (transformers 5.x; the default) or 'input' (Meta's reference, transformers "
                          "4.x); the indices are translated so that reader computes the trained model")
    exp.add_argument("--max-shard-size", default="5GiB", help="largest safetensors file, e.g. 5GB or 512MiB; "
                                                              "bigger models are split into files + an index")
    exp.add_argument("--tokenizer", default="", help="default: the files `import` kept with the checkpoint, else "
                                                    "the config's data.tokenizer, else the run's workdir's")
    exp.set_defaults(func=cmd_export)

    trn = sub.add_parser("train", help="train (or resume, when workdir holds a checkpoint)")
    trn.add_argument("--config", required=True, help="a YAML config (model, mesh, train, workdir)")
    trn.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. workdir=/tmp/run train.steps=100")
    trn.set_defaults(func=cmd_train)

    evl = sub.add_parser("eval", help="held-out VQA exact-match accuracy and answer perplexity per source")
    evl.add_argument("--config", required=True, help="a YAML config whose data.eval_sources are evaluated")
    evl.add_argument("--checkpoint", required=True, help="a checkpoint directory (or one step inside it)")
    _batch_args(evl, "records", max_new_tokens=8)
    evl.add_argument("--tokenizer", default="", help="default: the config's data.tokenizer, else the one "
                                                     "training kept in the run's workdir")
    evl.add_argument("--json", default="", help="also write the results to this JSON file")
    evl.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    evl.set_defaults(func=cmd_eval)

    sop = sub.add_parser("soup", help="one checkpoint from several fine-tuned from the same model: their mean "
                                      "(average), the greedy soup, or the best one (max) by held-out accuracy")
    sop.add_argument("--checkpoints", required=True, nargs="+", help="checkpoint directories (or steps inside "
                                                                     "them) of one architecture")
    sop.add_argument("--method", required=True, choices=("average", "greedy", "max"))
    sop.add_argument("--eval-config", default="", help="a YAML config whose data.eval_sources score the "
                                                        "checkpoints and soups (needed by greedy and max)")
    sop.add_argument("--out", required=True)
    _batch_args(sop, "records", max_new_tokens=8)
    sop.add_argument("--tokenizer", default="", help="default: the eval config's data.tokenizer, else the first "
                                                     "checkpoint's")
    sop.add_argument("--json", default="", help="also write the scores to this JSON file")
    sop.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --eval-config")
    sop.set_defaults(func=cmd_soup)

    sco = sub.add_parser("score", help="a reward model's scores of answers, and its pairwise accuracy on "
                                       "preference records")
    sco.add_argument("--checkpoint", required=True, help="a reward model's checkpoint (model.reward_head)")
    what = sco.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a YAML config whose data.eval_sources (preference or SFT records) are scored")
    what.add_argument("--jsonl", help="a JSONL file of preference or SFT records (the run's data settings apply)")
    _batch_args(sco, "records", max_new_tokens=None, batch_help="rows per batch (a preference record takes two)")
    sco.add_argument("--tokenizer", default="", help="default: the config's data.tokenizer, else the one "
                                                     "training kept in the run's workdir")
    sco.add_argument("--json", default="", help="also write the results and every record's scores to this JSON file")
    sco.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
    sco.set_defaults(func=cmd_score)

    smp = sub.add_parser("sample", help="rejection sampling: N sampled answers per prompt, the best one kept when "
                                        "a reward model or a verifier scores it high enough, as a JSONL SFT set")
    smp.add_argument("--config", required=True, help="a YAML config whose data.eval_sources are the prompts (SFT "
                                                     "records with reference answers)")
    smp.add_argument("--checkpoint", required=True, help="the policy's checkpoint directory (or one step inside it)")
    judge = smp.add_mutually_exclusive_group(required=True)
    judge.add_argument("--reward-checkpoint", help="a reward model's checkpoint (model.reward_head) scoring answers")
    judge.add_argument("--verifier", choices=("exact_match",), help="exact_match: an answer counts when it matches "
                                                                    "the record's reference (VQA normalisation)")
    smp.add_argument("--threshold", type=float, default=None, help="with --reward-checkpoint: keep a prompt's best "
                                                                   "answer only when its score is above this "
                                                                   "(default: keep every prompt's best)")
    smp.add_argument("--out", required=True, help="a new folder: data.jsonl (+ images/*.png of in-memory images)")
    smp.add_argument("--num-samples", type=_POSITIVE, default=4, help="answers drawn per prompt")
    _sampling_args(smp, temperature=0.7)
    _batch_args(smp, "prompts", max_new_tokens=32)
    smp.add_argument("--tokenizer", default="", help="the policy's; default: the config's data.tokenizer, else the "
                                                     "one training kept in the run's workdir")
    smp.add_argument("--json", default="", help="also write the summary per source to this JSON file")
    smp.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
    smp.set_defaults(func=cmd_sample)

    gen = sub.add_parser("generate", help="answer prompts about images (KV-cached, jitted)")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--image", required=True, action="append", help="an image file; repeat for several")
    gen.add_argument("--prompt", required=True, action="append", help="a question; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=_POSITIVE, default=32)
    _sampling_args(gen, temperature=0.0)
    gen.add_argument("--tokenizer", default="")
    gen.add_argument("--json", default="", help="also write [{image, prompt, answer}, ...] to this JSON file")
    gen.set_defaults(func=cmd_generate)

    pln = sub.add_parser("plan", help="compile the train step for a Cloud TPU slice on this machine; memory, "
                                      "FLOPs, step time (needs pip install -e '.[tpu]')")
    pln.add_argument("--config", required=True)
    pln.add_argument("--topology", required=True, help="a slice name: v5p-64, v5e-256, v6e-64, v4-128, ...")
    pln.add_argument("--mfu", type=_FRACTION, default=0.4, help="assumed model FLOPs utilisation for step time")
    pln.add_argument("--stage", action="append", help="plan only this recipe stage; repeat for several "
                                                      "(default: every stage)")
    pln.add_argument("--json", default="", help="also write every stage's figures to this JSON file")
    pln.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pln.set_defaults(func=cmd_plan)
    return p


def _environment_error(e: OSError) -> str | None:
    """One line for a failure of the machine or a user's path (permissions, full disk, a file where a folder
    belongs, ...), or None for any other OSError, which is a bug and keeps its traceback."""
    why = _ENVIRONMENT_ERRORS.get(e.errno)
    if why is None:
        return None
    where = e.filename if e.filename is not None else e.strerror or e
    return f"{where}: {why}"


def _skip_absent_tpu():
    """libtpu (installed for `plan`) prints start-up warnings on a machine without a TPU as soon as JAX looks for
    one. Without a TPU chip on the PCI bus (JAX's own test, as in jax._src.cloud_tpu_init), GPU or
    JAX_FORCE_TPU_INIT, JAX_PLATFORMS=cpu says what JAX would pick anyway; a user's JAX_PLATFORMS is never
    changed."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    import jax
    from jax._src import hardware_utils
    if (hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu()
            or hardware_utils.num_available_amd_gpus(stop_at=1)):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # for worker processes
    jax.config.update("jax_platforms", "cpu")  # jax read the environment when it was imported


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its one line (or --help): its exit code, also to Python callers
        return e.code if isinstance(e.code, int) else 2
    if args.func is not cmd_plan:  # plan sets its own host platform before jax is imported
        _skip_absent_tpu()
    from vlm_jax.errors import UserError
    try:
        args.func(args)
        return 0
    except UserError as e:
        message = str(e)
    except OSError as e:
        message = _environment_error(e)
        if message is None:
            raise
    print(f"vlm-jax {args.command}: error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 2


def run():
    """The `vlm-jax` command: once with huge pages for host memory (see host_memory), then `main`."""
    host_memory.exec_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    run()
