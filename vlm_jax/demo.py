"""`make demo`: train configs/demo.yaml from nothing, evaluate it on every held-out task next to a baseline that
cannot see the image, plot loss and accuracy, export to Hugging Face, and answer the held-out questions again
with transformers' PyTorch `generate`, JAX and PyTorch side by side.

    python -m vlm_jax.demo [dotted.key=value ...]     # e.g. train.steps=100 workdir=/tmp/demo_quick

Writes into the workdir (default workdirs/demo; local, since transformers loads hf/ from disk): checkpoints/,
metrics.jsonl, demo.png, hf/ and demo_summary.json. Running it again resumes training (or skips it when
finished) and redoes the rest.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np

from vlm_jax import host_memory
from vlm_jax.config import load_config
from vlm_jax.convert.processor import export_repo
from vlm_jax.infer.answer import Answerer
from vlm_jax.infer.evaluate import SourceResult, evaluate_records, read_records, results_table, source_label
from vlm_jax.infer.hf_reference import hf_generate, load_hf_mllama
from vlm_jax.paths import is_nonempty, is_remote, user_path, write_atomic
from vlm_jax.train.loop import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo.yaml")
SHOW_PER_TASK = 3  # held-out questions printed per task in the JAX vs PyTorch table


def read_metrics(metrics_path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def plot(metrics_path, out_path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    records = read_metrics(metrics_path)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    loss_ax.set(xlabel="step", ylabel="loss per supervised token", yscale="log", title="loss")
    loss_ax.legend()
    for key in sorted({k for r in evals for k in r if k.startswith("eval_accuracy/")}):
        points = [(r["step"], r[key]) for r in evals if key in r]
        acc_ax.plot(*zip(*points), "o-", label=key.split("/")[1])
    acc_ax.set(xlabel="step", ylabel="exact match", ylim=(0, 1.02), title="held-out accuracy (greedy)")
    acc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic(out_path, png.getvalue())
    plt.close(fig)


def compare_with_pytorch(answerer, hf_dir: str, records_per_task: dict[str, list[dict]],
                         results: list[SourceResult]) -> tuple[dict[str, int], list[tuple]]:
    """PyTorch greedy answers of the exported model to the same prompts, against the JAX answers in `results`;
    per-task disagreement counts and sample rows (task, question, truth, JAX answer, PyTorch answer)."""
    hf_model = load_hf_mllama(hf_dir)
    mismatches, shown = {}, []
    for result in results:
        records = records_per_task[result.label]
        theirs, _ = answerer.generate_tokens(records, backend=lambda p: hf_generate(hf_model, p, answerer.sampling))
        mismatches[result.label] = int(np.sum(np.any(result.tokens != theirs, axis=1)))
        rows = list(zip(records, answerer.decode(result.tokens), answerer.decode(theirs)))
        for record, a, b in rows[::max(1, len(rows) // SHOW_PER_TASK)][:SHOW_PER_TASK]:
            shown.append((result.label, record["turns"][0][1].replace("<image>", ""), record["turns"][-1][1], a, b))
    return mismatches, shown


def main(argv: list[str]) -> int:
    cfg = load_config(CONFIG, ["workdir=" + os.path.join(REPO, "workdirs", "demo")] + argv)
    if is_remote(cfg.workdir):
        print(f"demo: workdir={cfg.workdir} must be a local folder (transformers loads the export from disk); "
              "train on gs:// with `vlm-jax train`", file=sys.stderr)
        return 2
    workdir = user_path(cfg.workdir, "workdir")
    print(f"== training {os.path.relpath(CONFIG, REPO)} in {workdir} (run again to resume)")
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.run()
    train_seconds = time.perf_counter() - start
    if result.stopped_by_signal:
        return 1
    steps = read_metrics(workdir / "metrics.jsonl")
    step_times = [r["step_time_s"] for r in steps if r["step"] > steps[0]["step"]] or [r["step_time_s"] for r in steps]
    print(f"training: {train_seconds:.0f} s wall in this run (compile, data and evals included); "
          f"{1 / float(np.median(step_times)):.2f} steps/s (median of logged steps)")

    params = result.state.params
    answerer = Answerer(trainer.model, params, trainer.data.tokenizer, cfg.data,
                        batch_size=cfg.data.shapes.batch_size * 4, max_new_tokens=4)
    print("\n== held-out accuracy (greedy, VQAv2-normalised exact match); the blind baseline always gives the "
          "most common answer, the best a model that cannot see the image can do")
    records = {source_label(s): read_records(s)[0] for s in cfg.data.eval_sources}
    results = [evaluate_records(answerer, label, recs) for label, recs in records.items()]
    print(results_table(results))

    plot_path = workdir / "demo.png"
    plot(workdir / "metrics.jsonl", plot_path)
    print(f"\nplot of loss and accuracy: {plot_path}")

    hf_dir = workdir / "hf"
    if is_nonempty(hf_dir):  # the previous run's export
        hf_dir.rmtree()
    changes, notes = export_repo(cfg.model, cfg.data, params, hf_dir, trainer.data.tokenizer)
    for change in changes:
        print(f"note: {change} (the config disagrees with the tokenizer; the export has the tokenizer's ids)")
    for note in notes:
        print(f"note: {note}")
    write_atomic(hf_dir / "tokenizer.model", (workdir / "tokenizer.model").read_bytes())
    print(f"exported to Hugging Face format: {hf_dir}")

    mismatches, shown = compare_with_pytorch(answerer, str(hf_dir), records, results)
    print("\n== held-out questions answered by JAX (vlm_jax) and by PyTorch (transformers generate on the export)")
    print(f"{'task':<22}{'question':<30}{'truth':<8}{'JAX':<8}PyTorch")
    for task, question, truth, ours, theirs in shown:
        print(f"{task:<22}{question:<30}{truth:<8}{ours:<8}{theirs}")
    total = sum(len(v) for v in records.values())
    agreed = sum(mismatches.values()) == 0
    print(f"\nJAX and PyTorch greedy answers agree on {total - sum(mismatches.values())} of {total} held-out "
          f"questions{'' if agreed else ' — MISMATCH: ' + str({k: v for k, v in mismatches.items() if v})}")

    summary = {
        "config": os.path.relpath(CONFIG, REPO), "steps": int(result.state.step),
        "train_wall_s_this_run": round(train_seconds, 1), "steps_per_s": round(1 / float(np.median(step_times)), 3),
        "accuracy": {r.label: r.accuracy for r in results},
        "baseline_accuracy": {r.label: r.baseline for r in results},
        "perplexity": {r.label: r.perplexity for r in results},
        "held_out_examples": {r.label: r.examples for r in results},
        "jax_pytorch_greedy_agree": agreed, "jax_pytorch_disagreements": mismatches,
        "plot": str(plot_path), "hf_dir": str(hf_dir),
    }
    write_atomic(workdir / "demo_summary.json", json.dumps(summary, indent=2))
    print(f"summary: {workdir / 'demo_summary.json'}")
    return 0 if agreed else 1


if __name__ == "__main__":
    host_memory.exec_with_huge_pages()
    sys.exit(main(sys.argv[1:]))
