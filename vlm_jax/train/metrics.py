"""Per-step metrics: DIR/metrics.jsonl (one object per logged step), TensorBoard events, a stdout line.

On resume both logs are cut back to the restored step, so the record continues without gaps or repeats
after a crash that happened past the last checkpoint. With several processes only the primary one (process 0)
writes the files (they share the workdir); every process prints its line. On an object store (gs://), which
has no appends, the logger keeps the run's records and rewrites metrics.jsonl at each logged step.
"""
from __future__ import annotations

import json

from tensorboardX import SummaryWriter

from vlm_jax.paths import atomic_open, is_remote, user_path


class MetricsLogger:
    def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True, echo=print, primary: bool = True,
                 total_steps: int = 0):
        workdir = user_path(workdir, "workdir")
        self.path = workdir / "metrics.jsonl"
        self.file = self.tb = self.lines = None
        self.echo, self.total_steps = echo, total_steps
        if not primary:
            return
        kept = self._truncate_after(resume_step)
        if is_remote(self.path):
            self.lines = kept
        else:
            self.file = self.path.open("a")
        # purge_step hides events past the restored step that a killed run had written
        self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1) if tensorboard else None

    def _truncate_after(self, step: int) -> list[str]:
        if not self.path.exists():
            return []
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        with atomic_open(self.path) as f:
            f.writelines(kept)
        return kept

    def write(self, record: dict):
        line = json.dumps(record) + "\n"
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        elif self.lines is not None:  # no appends on an object store: rewrite the object
            self.lines.append(line)
            with atomic_open(self.path) as f:
                f.writelines(self.lines)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.echo(progress_line(record, self.total_steps))

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def progress_line(r: dict, total_steps: int = 0) -> str:
    """One line per logged step; with the run's last step known, a progress bar and the time left."""
    bar = ""
    if total_steps:
        done = min(r["step"] / total_steps, 1.0)
        left = int((total_steps - r["step"]) * r["step_time_s"])
        bar = f"[{'#' * round(done * 20):<20}] {done:4.0%} {left // 60}m{left % 60:02d}s left  "
    evals = "".join(f"  {k.replace('eval_accuracy/', 'acc ')} {v:.3f}" for k, v in r.items() if k.startswith("eval_"))
    return (f"{bar}step {r['step']:>6}  loss {r['loss']:.4f}  grad_norm {r['grad_norm']:.3f}  lr {r['lr']:.2e}  "
            f"{r['tokens_per_s']:,.0f} tok/s  {r['step_time_s'] * 1e3:.1f} ms/step"
            + (f"  mfu {r['mfu']:.2%}" if "mfu" in r else "")
            + (f"  skipped {r['nonfinite_total']}" if r.get("nonfinite_total") else "") + evals)
