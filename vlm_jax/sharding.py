"""Mesh from config and logical-axis rule presets: the only place logical names meet mesh axes."""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
import yaml
from etils import epath
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlm_jax.config import MeshConfig
from vlm_jax.errors import ConfigError
from vlm_jax.paths import resolve_from

MESH_AXES = ("data", "fsdp", "tensor")
RULES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mesh")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def resolve_axis_sizes(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Fills the one -1 entry so the product is `total`; fails with one line when impossible."""
    auto = [k for k, v in sizes.items() if v == -1]
    if len(auto) > 1:
        raise ConfigError(f"{what}: only one of {', '.join(auto)} may be -1 (auto)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if auto:
        if total % fixed:
            raise ConfigError(f"{what}: {total} devices are not divisible by the fixed axes' product {fixed}")
        sizes = {**sizes, auto[0]: total // fixed}
    if math.prod(sizes.values()) != total:
        raise ConfigError(f"{what}: axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
                          f"{total} devices; set one axis to -1 or change the sizes")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: getattr(cfg, f"dcn_{a}") for a in MESH_AXES}
    num_slices = math.prod(dcn.values())
    if len(devices) % num_slices:
        raise ConfigError(f"mesh.dcn_*: {len(devices)} devices do not split into {num_slices} slices")
    ici = resolve_axis_sizes({a: getattr(cfg, a) for a in MESH_AXES}, len(devices) // num_slices, "mesh")
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES],
                                                    devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh([ici[a] for a in MESH_AXES], devices)
        except (AssertionError, NotImplementedError, ValueError):  # topology-unaware fallback (CPU, odd shapes)
            grid = np.asarray(devices).reshape([ici[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def load_rules(name_or_path: str) -> Rules:
    """A rule table: a preset in configs/mesh/ or a YAML file (local or gs://). A table may name `base:`, a
    preset or a path relative to itself, and list only what differs from it. Its own rules go ahead of its
    base's, because within one array a mesh axis goes to the first rule that claims it."""
    table = _read_rules(_rule_file(name_or_path, epath.Path(".")), f"'{name_or_path}'", ())
    return tuple((logical, axes if len(axes) > 1 else (axes[0] if axes else None)) for logical, axes in table.items())


def _rule_file(ref: str, here: epath.Path) -> epath.Path:
    """A preset name, or a YAML path (absolute, gs://, or relative to `here`)."""
    if not ref.endswith((".yaml", ".yml")):
        return epath.Path(RULES_DIR) / f"{ref}.yaml"
    return resolve_from(here, ref, "mesh.rules")  # one spelling per file, for the cycle check


def _read_rules(path: epath.Path, what: str, chain: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    if str(path) in chain:
        raise ConfigError(f"mesh.rules: `base:` cycle {' -> '.join(chain + (str(path),))}; remove one of them")
    if not path.is_file():
        presets = sorted(f[:-5] for f in os.listdir(RULES_DIR) if f.endswith(".yaml"))
        raise ConfigError(f"mesh.rules: {what} is neither a preset ({', '.join(presets)}) nor a YAML file")
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: a rule table maps logical axis names to mesh axes, e.g. `embed: fsdp`")
    base_ref = table.pop("base", None)
    rules = {}
    for logical, mesh_axes in table.items():
        axes = tuple(mesh_axes) if isinstance(mesh_axes, list) else (mesh_axes,) if mesh_axes else ()
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"{path}: rule '{logical}' names unknown mesh axis '{bad[0]}'; use {MESH_AXES}")
        rules[logical] = axes
    if base_ref is None:
        return rules
    base = _read_rules(_rule_file(str(base_ref), path.parent), f"base '{base_ref}' in {path}", chain + (str(path),))
    unknown = [k for k in rules if k not in base]
    if unknown:
        raise ConfigError(f"{path}: '{unknown[0]}' is no logical axis of base '{base_ref}'; check the spelling "
                          f"against configs/mesh/base.yaml")
    return {**rules, **{k: v for k, v in base.items() if k not in rules}}


def logical_specs(abstract_boxed):
    """Tree of logical axis-name tuples (None for unannotated leaves)."""
    return nn.get_partition_spec(abstract_boxed)


def mesh_spec(logical: PartitionSpec, rules: Rules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def param_shardings(abstract_boxed, mesh: Mesh, rules: Rules, replicate_indivisible: bool = False):
    """NamedShardings for a boxed (LogicallyPartitioned) abstract tree; checks divisibility first, or with
    `replicate_indivisible` (inference on whatever devices there are) leaves a dimension its mesh axes do not
    divide unsharded."""
    if not replicate_indivisible:
        check_divisible(abstract_boxed, mesh, rules)
        specs = logical_specs(abstract_boxed)
        return jax.tree.map(lambda s: NamedSharding(mesh, mesh_spec(s, rules)), specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def divisible(leaf, logical):
        spec = mesh_spec(logical, rules)
        return NamedSharding(mesh, PartitionSpec(*(e if size % _axis_size(mesh, e) == 0 else None
                                                   for size, e in zip(leaf.shape, spec))))
    return jax.tree.map(divisible, nn.meta.unbox(abstract_boxed), logical_specs(abstract_boxed))


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))


def check_divisible(abstract_boxed, mesh: Mesh, rules: Rules):
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_boxed))[0]
    specs = jax.tree.leaves(logical_specs(abstract_boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), logical in zip(flat, specs):
        for dim, (size, entry) in enumerate(zip(leaf.shape, mesh_spec(logical, rules))):
            n = _axis_size(mesh, entry)
            if size % n:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(f"parameter {name} dim {dim} ('{logical[dim]}', size {size}) is not divisible by "
                                  f"mesh axes {entry} (size {n}); change mesh sizes or the rules preset")


def data_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Batch-leading arrays: shard axis 0 as logical `batch`, replicate the rest."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(batch: dict, mesh: Mesh, rules: Rules) -> dict:
    """Places a host-local numpy batch as global arrays (single process: the batch is the global batch)."""
    return {k: jax.device_put(np.asarray(v), data_sharding(mesh, rules, np.ndim(v))) for k, v in batch.items()}


def sharding_table(abstract_boxed, mesh: Mesh, rules: Rules, trainable: dict | None = None) -> str:
    """One line per parameter: logical axes, mesh spec, bytes per device, trainable/frozen."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_boxed))[0]
    specs = jax.tree.leaves(logical_specs(abstract_boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))
    rows = [("parameter", "shape", "logical axes", "mesh spec", "bytes/device", "train")]
    for (path, leaf), logical in zip(flat, specs):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = mesh_spec(logical, rules)
        shards = math.prod(_axis_size(mesh, e) for e in spec)
        per_device = leaf.size * leaf.dtype.itemsize // shards
        state = "" if trainable is None else ("yes" if trainable.get(name, True) else "frozen")
        rows.append((name, str(tuple(leaf.shape)), str(tuple(logical)), str(tuple(spec)), f"{per_device:,}", state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
