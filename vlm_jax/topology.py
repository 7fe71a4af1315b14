"""Cloud TPU slice names -> libtpu topology descriptions, for ahead-of-time planning on CPU (chip specs live
in vlm_jax.hardware).

Needs libtpu (`pip install -e .[tpu]`); nothing here touches a real TPU.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from vlm_jax.hardware import CHIPS, Chip, TopologyError


@dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    num_chips: int
    topology: str  # e.g. "v5p:2x4x4"


def _grid(num_chips: int, dims: int) -> tuple[int, ...]:
    """Most cube-like power-of-two grid, smallest dimension first and a unit dimension last (how Cloud TPU
    shapes default slices: v5p-8 is 2x2x1, v5p-64 is 2x4x4)."""
    shape = [1] * dims
    n, i = num_chips, 0
    while n > 1:
        shape[dims - 1 - i % dims] *= 2
        n //= 2
        i += 1
    shape.sort()
    return tuple(shape[1:] + shape[:1]) if shape[0] == 1 and num_chips > 1 else tuple(shape)


def parse_slice(name: str) -> Slice:
    """'v5p-64' -> 32 chips on a 2x4x4 torus; 'v5e-256' -> 256 chips on 16x16."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise TopologyError(f"--topology '{name}' is not a Cloud TPU slice name like v5p-64, v5e-256, v6e-64 or "
                            "v4-128")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    chip, count = CHIPS[gen], int(m.group(2))
    num_chips = count // chip.cores_in_name
    if num_chips < 1 or num_chips & (num_chips - 1) or count % chip.cores_in_name:
        raise TopologyError(f"--topology '{name}': {count} is not a valid {gen} slice size (a power of two"
                            f"{' of TensorCores, 2 per chip' if chip.cores_in_name == 2 else ' of chips'})")
    grid = _grid(num_chips, chip.dims)
    return Slice(name, chip, num_chips, f"{chip.generation}:{'x'.join(map(str, grid))}")


def topology_devices(s: Slice):
    """The slice's devices as libtpu describes them (compile targets, not runnable)."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Describing a slice touches no TPU, so the lock libtpu takes against concurrent TPU users is moot.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(topology_name=s.topology, platform="tpu")
    except Exception as e:  # libtpu missing or rejecting the shape; its message is long, keep its first line
        import importlib.util
        hint = "" if importlib.util.find_spec("libtpu") else "; install the TPU extra: pip install -e '.[tpu]'"
        raise TopologyError(f"cannot describe {s.name} ({s.topology}): {str(e).splitlines()[0][:160]}{hint}") \
            from None
    return list(desc.devices)


def devices_per_chip(s: Slice, devices) -> int:
    return max(1, math.ceil(len(devices) / s.num_chips))
