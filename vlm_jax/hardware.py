"""What the accelerators are: peak FLOP/s by the `device_kind` JAX reports, and Cloud TPU chip specs."""
from __future__ import annotations

import re
from dataclasses import dataclass

import jax

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
# CPU has no peak: MFU there is a relative figure only.
NOMINAL_FLOPS = 1e11


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


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, bool]:
    """(peak FLOP/s, nominal?) for the first device; `configured` > 0 wins. CPU and, for now, a chip missing
    from the table get NOMINAL_FLOPS."""
    if configured > 0:
        return configured, False
    peak = peak_bf16_flops(jax.devices()[0].device_kind)
    return (NOMINAL_FLOPS, True) if peak is None else (peak, False)
