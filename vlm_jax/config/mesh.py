"""The `mesh:` and `distributed:` sections: device mesh axis sizes, rule preset, multi-process runtime."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_jax.config.loader import check


@dataclass(frozen=True)
class MeshConfig:
    # Sizes inside one slice (ICI); -1 takes the devices that are left. Product must equal the device count.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Across slices (DCN) for multi-slice runs; the product is the number of slices.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: str = "fsdp"  # a preset name in configs/mesh/ or a path to a YAML rule table


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runtime. "auto" initialises jax.distributed when the environment says there are several
    processes (TPU VM pod workers, a SLURM job with several tasks); "explicit" uses the fields below."""
    mode: str = "auto"  # "auto" | "explicit" | "off"
    coordinator_address: str = ""  # host:port of process 0 (explicit mode)
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout_s: int = 300


def validate_mesh(m: MeshConfig, d: DistributedConfig):
    for axis in ("data", "fsdp", "tensor"):
        n = getattr(m, axis)
        check(n == -1 or n > 0, f"mesh.{axis} must be positive or -1 (auto), got {n}")
    check(d.mode in ("auto", "explicit", "off"), f"distributed.mode: '{d.mode}' is not auto, explicit or off")
    if d.mode == "explicit":
        check(":" in d.coordinator_address, "distributed.coordinator_address must be host:port in explicit mode")
        check(0 <= d.process_id < d.num_processes,
              f"distributed.process_id ({d.process_id}) must be in [0, num_processes={d.num_processes})")
