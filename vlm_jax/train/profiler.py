"""train.profile_steps: a jax.profiler trace of a range of training steps, viewable in TensorBoard or Perfetto.

The trace starts before step a is dispatched and stops once step b has finished on the device. jax.profiler
writes through the local file system only, so for a workdir on an object store (gs://) the trace is written to
a local temporary folder and uploaded file by file into <workdir>/profile afterwards.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax

from vlm_jax.paths import is_remote, user_path


class StepProfiler:
    def __init__(self, workdir: str, steps: tuple[int, ...], echo=print):
        self.target = user_path(workdir, "workdir") / "profile"
        self.first, self.last = steps if steps else (0, 0)
        self.echo, self.local = echo, None

    def before(self, step: int):
        """Call before dispatching `step` (1-based); starts the trace at the first profiled step."""
        if step == self.first and self.local is None:
            self.local = Path(tempfile.mkdtemp(prefix="vlm_jax_profile_")) if is_remote(self.target) else self.target
            jax.profiler.start_trace(str(self.local))

    def after(self, step: int, outputs):
        """Call after dispatching `step`; at the last profiled step waits for `outputs` and stops the trace."""
        if self.local is None or step < self.last:
            return
        jax.block_until_ready(outputs)
        self.stop()
        self.echo(f"profiled steps {self.first}..{step} into {self.target}")

    def stop(self):
        """Ends a running trace (also when the run stops inside the profiled range)."""
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if self.local is not self.target:
            for f in self.local.rglob("*"):
                if f.is_file():
                    dest = self.target / f.relative_to(self.local).as_posix()
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(f.read_bytes())
            shutil.rmtree(self.local)
        self.local = None
