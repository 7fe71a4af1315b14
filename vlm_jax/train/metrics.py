"""Per-step metrics: DIR/metrics.jsonl (one object per logged step), TensorBoard events, a stdout line.

On resume both logs are cut back to the restored step, so the record continues without gaps or repeats
after a crash that happened past the last checkpoint.
"""
from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter

FIELDS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "tflops_per_device", "mfu",
          "supervised_fraction")


class MetricsLogger:
    def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True, echo=print):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        # purge_step hides events past the restored step that a killed run had written
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1) \
            if tensorboard else None
        self.echo = echo

    def _truncate_after(self, step: int):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.echo(progress_line(record))

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def progress_line(r: dict) -> str:
    return (f"step {r['step']:>6}  loss {r['loss']:.4f}  grad_norm {r['grad_norm']:.3f}  lr {r['lr']:.2e}  "
            f"{r['tokens_per_s']:,.0f} tok/s  {r['step_time_s'] * 1e3:.1f} ms/step  mfu {r['mfu']:.2%}"
            + (f"  skipped {r['nonfinite_total']}" if r.get("nonfinite_total") else ""))
