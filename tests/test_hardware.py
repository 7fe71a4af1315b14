"""One peak-FLOPs table read through the device_kind strings JAX reports, and one TopologyError."""
import jax
import pytest

from vlm_jax import distributed, hardware, topology
from vlm_jax.config import DistributedConfig

VENDOR_PEAK = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


@pytest.mark.parametrize("generation", sorted(hardware.CHIPS))
def test_every_tpu_generation_has_a_peak_through_its_device_kind(generation):
    chip = hardware.CHIPS[generation]
    assert hardware.peak_bf16_flops(chip.device_kind) == chip.peak_bf16_flops == VENDOR_PEAK[generation]


@pytest.mark.parametrize("kind,peak", [
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA H200", 989e12), ("NVIDIA B200", 2.25e15),
    ("cpu", None), ("TPU v7", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_device_kinds_resolve(kind, peak):
    assert hardware.peak_bf16_flops(kind) == peak


def test_cpu_peak_is_measured_unless_configured():
    assert jax.devices()[0].platform == "cpu"
    peak = hardware.peak_flops_per_device()
    assert peak.source == "this CPU's measured fp32 matmul peak" and 1e8 < peak.flops < 1e14 and peak.measured
    assert peak.flops == hardware.peak_flops_per_device().flops  # measured once per process
    assert hardware.peak_flops_per_device(1e12) == (1e12, "train.peak_flops_per_device", False)


def test_an_accelerator_missing_from_the_table_gets_no_peak(monkeypatch):
    class Device:
        platform, device_kind = "gpu", "NVIDIA GeForce RTX 4090"
    monkeypatch.setattr(hardware.jax, "devices", lambda: [Device()])
    peak = hardware.peak_flops_per_device()
    assert peak.flops is None and "no MFU is reported" in peak.source


def test_distributed_and_topology_raise_the_same_topology_error():
    assert distributed.TopologyError is topology.TopologyError is hardware.TopologyError
    with pytest.raises(hardware.TopologyError, match="not a Cloud TPU slice name"):
        topology.parse_slice("v5p64")
    with pytest.raises(hardware.TopologyError, match="found 1 processes but the launch asked for 2"):
        distributed.check_processes(DistributedConfig(mode="explicit", num_processes=2))
