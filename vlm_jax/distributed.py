"""Multi-process runtime: initialise jax.distributed from the environment, then check that the processes and
devices found are the ones the mesh config asks for, before anything is allocated."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax.config import DistributedConfig
from vlm_jax.hardware import TopologyError


def environment_processes() -> int:
    """How many processes the launcher started, as the environment tells it (1 when nothing does)."""
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS"):
        return int(os.environ["SLURM_NTASKS"])
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h and h != "localhost"]
    return max(len(hosts), 1)


def initialize(cfg: DistributedConfig) -> None:
    """Idempotent; a single process never starts a coordinator."""
    if cfg.mode == "off" or jax.distributed.is_initialized():
        return
    if cfg.mode == "explicit":
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                   initialization_timeout=cfg.initialization_timeout_s)
    elif environment_processes() > 1:  # jax detects TPU pods and SLURM itself
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout_s)


def check_processes(cfg: DistributedConfig) -> str:
    """Raises TopologyError (one line) when the processes found are not the ones launched; returns a summary.
    Device counts against the mesh are checked by `sharding.make_mesh`."""
    want = cfg.num_processes if cfg.mode == "explicit" else environment_processes()
    if cfg.mode != "off" and jax.process_count() != want:
        raise TopologyError(f"found {jax.process_count()} processes but the launch asked for {want}; check the "
                            "coordinator address and that every worker runs the same command")
    return (f"{jax.process_count()} process(es) x {jax.local_device_count()} {jax.devices()[0].platform} "
            f"device(s) = {jax.device_count()}; this is process {jax.process_index()}")


def gather_ints(value: int) -> np.ndarray:
    """`value` from every process, in process order: the same array on all of them. One all-gather of an int32
    per process (a tiny collective, see `benchmarks/stop_agreement.py`); none when there is one process."""
    if jax.process_count() == 1:
        return np.asarray([value], np.int32)
    return np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).reshape(-1)
