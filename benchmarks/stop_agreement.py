"""Per-step cost of the stop agreement: at every step boundary the processes all-gather one int32 each
(`vlm_jax.distributed.gather_ints`) so that a SIGTERM or Ctrl-C on any one of them stops all after the same step.

    python benchmarks/stop_agreement.py [--calls 300]

Times the call with 1 process (no collective at all) and with 2 processes x 4 CPU devices on localhost (gloo, the
setup of tests/test_multiprocess.py); prints the median and 90th percentile per call.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from vlm_jax import distributed


def _time_calls(calls: int) -> np.ndarray:
    distributed.gather_ints(0)  # compiles once
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        distributed.gather_ints(0)
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def _report(label: str, times: np.ndarray):
    print(f"{label}: median {np.median(times) * 1e6:.0f} us, p90 {np.percentile(times, 90) * 1e6:.0f} us per step "
          f"({len(times)} calls)")


def _worker(process_id: int, port: int, calls: int):
    jax.distributed.initialize(f"localhost:{port}", 2, process_id)
    times = _time_calls(calls)
    if process_id == 0:
        _report("2 processes x 4 CPU devices (gloo)", times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--worker", type=int, nargs=2, metavar=("PROCESS_ID", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(*args.worker, args.calls)
    _report("1 process", _time_calls(args.calls))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, __file__, "--calls", str(args.calls), "--worker", str(i), str(port)],
                              env=env) for i in range(2)]
    if any(proc.wait(timeout=300) for proc in procs):
        sys.exit("a worker failed")


if __name__ == "__main__":
    main()
