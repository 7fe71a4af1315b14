"""What the accelerators are: peak FLOP/s by the `device_kind` JAX reports, and Cloud TPU chip specs."""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError

GiB = 1 << 30

# Dense bf16 peak FLOP/s per JAX device (vendor figures; v4 and v5p show one device per chip, both cores).
# A TPU key is the exact device_kind; a GPU key is the kind's first word after "NVIDIA", since GPU kinds
# append memory and form factor ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"). GPU figures are the SXM
# parts'; PCIe and NVL parts are slower, so set train.peak_flops_per_device there.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,  # v6e
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2.25e15,
}
# Spellings some runtimes report instead (JAX's own Pallas chip table accepts both).
KIND_ALIASES = {"TPU v5e": "TPU v5 lite", "TPU v5p": "TPU v5", "TPU v6e": "TPU v6 lite"}
MATMUL_SIDE = 1024  # the CPU peak: best of a few fp32 (n x n) @ (n x n) products, large enough to be compute-bound


class TopologyError(UserError):
    """The slice, devices or processes are not the ones asked for."""


@dataclass(frozen=True)
class Chip:
    generation: str  # libtpu's name for the topology string
    device_kind: str
    hbm_bytes: int
    cores_in_name: int  # slice names count TensorCores (v4, v5p: 2 per chip) or chips (v5e, v6e)
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)

    @property
    def peak_bf16_flops(self) -> float:
        return PEAK_BF16_FLOPS[self.device_kind]


CHIPS = {  # public Cloud TPU specifications
    "v4": Chip("v4", "TPU v4", 32 * GiB, 2, 3),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2, 3),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 1, 2),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 1, 2),
}


def peak_bf16_flops(device_kind: str) -> float | None:
    """The table's figure for a device_kind, or None for a chip it lacks (and for CPU)."""
    gpu = re.match(r"NVIDIA [^\s-]+", device_kind)
    return PEAK_BF16_FLOPS.get(gpu.group(0) if gpu else KIND_ALIASES.get(device_kind, device_kind))


class Peak(NamedTuple):
    flops: float | None  # per device; None = unknown, so no MFU is reported
    source: str  # what the figure is, for the log line
    measured: bool = False  # timed on this machine (CPU), so it moves with the machine's load; else a fixed figure


_square = jax.jit(lambda x: x @ x)


def matmul_peak_now(side: int = MATMUL_SIDE, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` fp32 square matmuls on the first device, measured now: a shared machine's
    peak moves, so a benchmark measures it alongside the steps it bills against it."""
    a = jnp.ones((side, side), jnp.float32)
    _square(a).block_until_ready()  # compiles once per side
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _square(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * side ** 3 / best


@functools.cache
def measured_matmul_peak() -> float:
    """The CPU's MFU denominator (CPU has no vendor peak): `matmul_peak_now`, once per process."""
    return matmul_peak_now()


def peak_flops_per_device(configured: float = 0.0) -> Peak:
    """The denominator of MFU: `configured` > 0 wins; an accelerator's dense bf16 figure from the table; on CPU
    a matmul peak measured once per process; None for an accelerator the table lacks (never a made-up figure)."""
    if configured > 0:
        return Peak(configured, "train.peak_flops_per_device")
    device = jax.devices()[0]
    if device.platform == "cpu":
        return Peak(measured_matmul_peak(), "this CPU's measured fp32 matmul peak", measured=True)
    peak = peak_bf16_flops(device.device_kind)
    if peak is None:
        return Peak(None, f"no peak FLOP/s known for device kind '{device.device_kind}': no MFU is reported; set "
                          "train.peak_flops_per_device to get one")
    return Peak(peak, f"{device.device_kind} dense bf16 peak")
