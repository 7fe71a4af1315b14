"""Orbax checkpoints: one CheckpointManager directory, one step per subdirectory, named items.

Items: `params` (always), `meta` (JSON: the run's full config and, for imported models, the original HF
config.json), and whatever else the trainer adds (optimizer state, data iterator). A checkpoint written by
`vlm-jax import` is step 0 with `params` + `meta`, so training, eval, generate and export read both alike.
Restores go through an abstract target carrying the CURRENT mesh's shardings, so the device count may differ.
"""
from __future__ import annotations

import contextlib

import absl.logging
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax import families, sharding
from vlm_jax.config import Config, from_dict, to_dict, validate
from vlm_jax.errors import UserError
from vlm_jax.paths import user_path
from vlm_jax.train.state import abstract_with_shardings

PARAMS, META = "params", "meta"
HANDLERS = {PARAMS: ocp.StandardCheckpointHandler, META: ocp.JsonCheckpointHandler}


absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax logs every read-only open as a warning


class CheckpointError(UserError):
    pass


def manager(directory, *, max_to_keep: int | None = None, keep_period: int | None = None,
            async_save: bool = False, item_names: tuple[str, ...] = (PARAMS, META), read_only: bool = False):
    """A CheckpointManager over `item_names` (handlers for other items: register them in HANDLERS)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period,
                                           enable_async_checkpointing=async_save, create=not read_only,
                                           read_only=read_only)
    handlers = {name: HANDLERS[name]() for name in item_names if name in HANDLERS}
    directory = user_path(directory, "checkpoint directory")  # Orbax writes gs:// itself (no renames there)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def meta_dict(config: Config, hf_config: dict | None = None, **extra) -> dict:
    return {"config": to_dict(config), "hf_config": hf_config, **extra}


def save_params(directory: str, params, config: Config, hf_config: dict | None = None, step: int = 0):
    """Writes a params-only checkpoint (what `vlm-jax import` produces)."""
    with manager(directory) as mgr:
        mgr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                                  META: ocp.args.JsonSave(meta_dict(config, hf_config))}))
        mgr.wait_until_finished()


def resolve(path) -> tuple[str, int]:
    """`path` is a manager directory (latest committed step) or one step directory inside it."""
    path = user_path(path, "--checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if path.name.isdigit() and (path / PARAMS).is_dir():
        return str(path.parent), int(path.name)
    with manager(path, read_only=True) as mgr:
        step = mgr.latest_step()
    if step is None:
        raise CheckpointError(f"{path}: no complete checkpoint step found; pass a directory written by "
                              "`vlm-jax train` or `vlm-jax import`")
    return str(path), step


def read_meta(path: str) -> tuple[Config, dict | None, int]:
    directory, step = resolve(path)
    with manager(directory, read_only=True) as mgr:
        meta = mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    config = from_dict(Config, meta["config"])
    validate(config)
    return config, meta.get("hf_config"), step


def params_metadata(path: str):
    """The array metadata (shapes, dtypes) of a checkpoint's params; nothing is read."""
    directory, step = resolve(path)
    with manager(directory, read_only=True) as mgr:
        return mgr.item_metadata(step)[PARAMS]


def restore_params(path: str, abstract_params=None, mesh=None, rules=None):
    """Params of a checkpoint, placed by `abstract_params` (ShapeDtypeStructs with shardings), or sharded over
    `mesh` by `rules` and its model's logical axes (a dimension the mesh does not divide stays replicated), so
    no device holds more than its share; without either they come back on one device."""
    directory, step = resolve(path)
    if mesh is not None:
        config, _, _ = read_meta(path)
        boxed = families.abstract_params(families.build_model(config.model))
        abstract_params = abstract_with_shardings(nn.meta.unbox(boxed), sharding.param_shardings(
            boxed, mesh, rules, replicate_indivisible=True))
    with manager(directory, read_only=True) as mgr:
        if abstract_params is None:
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(
                    jax.devices()[0])), mgr.item_metadata(step)[PARAMS])
        restored = mgr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)}))
    return restored[PARAMS]


class _StoredArray:
    """One array of a checkpoint, read from storage (as numpy) each time np.asarray asks for it."""

    def __init__(self, handler, item_dir, keys: tuple, meta):
        self._handler, self._item_dir, self._keys = handler, item_dir, keys
        self.shape, self.dtype = tuple(meta.shape), np.dtype(meta.dtype)

    def _nest(self, leaf):
        for key in reversed(self._keys):
            leaf = {key: leaf}
        return leaf

    def __array__(self, dtype=None, copy=None):
        item = self._nest(jax.ShapeDtypeStruct(self.shape, self.dtype))
        restored = self._handler.restore(self._item_dir, args=ocp.args.PyTreeRestore(
            item, restore_args=self._nest(ocp.RestoreArgs(restore_type=np.ndarray)), partial_restore=True))
        for key in self._keys:
            restored = restored[key]
        return restored if dtype is None else restored.astype(dtype)


@contextlib.contextmanager
def lazy_params(path):
    """The params tree of a checkpoint whose leaves are read from storage only when np.asarray converts them,
    one at a time: a caller that converts and drops them in turn (`convert.to_hf`) never holds the whole model."""
    directory, step = resolve(path)
    item_dir = user_path(directory, "--checkpoint") / str(step) / PARAMS
    handler = ocp.PyTreeCheckpointHandler()  # StandardCheckpointHandler restores only whole trees
    try:
        meta = handler.metadata(item_dir).tree
        yield jax.tree_util.tree_map_with_path(
            lambda keys, m: _StoredArray(handler, item_dir, tuple(k.key for k in keys), m), meta)
    finally:
        handler.close()


# ------------------------------------------------------------------------------------------ training

OPT_STATE, TRAIN_STATE, DATA_ITER = "opt_state", "train_state", "data_iter"
HANDLERS.update({OPT_STATE: ocp.StandardCheckpointHandler, TRAIN_STATE: ocp.JsonCheckpointHandler,
                 DATA_ITER: ocp.JsonCheckpointHandler})
TRAIN_ITEMS = (PARAMS, META, OPT_STATE, TRAIN_STATE, DATA_ITER)
TMP_MARKER = ".orbax-checkpoint-tmp"


def train_manager(directory: str, *, max_to_keep: int, keep_every: int, async_save: bool):
    """Keeps the newest `max_to_keep` committed steps plus every `keep_every`-th step."""
    return manager(directory, max_to_keep=max_to_keep, keep_period=keep_every or None, async_save=async_save,
                   item_names=TRAIN_ITEMS)


def save_train(mgr, step: int, *, params, opt_state, train_state: dict, data_iter: dict, meta: dict):
    """Starts a (possibly async) save; device buffers are copied out before this returns, so the caller may
    donate them to the next step."""
    mgr.save(step, force=True, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params), OPT_STATE: ocp.args.StandardSave(opt_state),
        TRAIN_STATE: ocp.args.JsonSave(train_state), DATA_ITER: ocp.args.JsonSave(data_iter),
        META: ocp.args.JsonSave(meta)}))


def committed_steps(directory) -> list[int]:
    directory = user_path(directory, "checkpoint directory")
    if not directory.is_dir():
        return []
    with manager(directory, read_only=True) as mgr:
        return list(mgr.all_steps())


def incomplete_steps(directory) -> list[str]:
    """Step directories an interrupted save left behind (never committed, so the manager ignores them).
    On an object store Orbax writes in place and commits with a marker file instead, so there are none."""
    directory = user_path(directory, "checkpoint directory")
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if TMP_MARKER in p.name)


def restore_train(mgr, step: int, abstract_params, abstract_opt_state) -> dict:
    """All training items of `step`, arrays placed by the abstract targets' shardings (the CURRENT mesh)."""
    return mgr.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_params), OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
        TRAIN_STATE: ocp.args.JsonRestore(), DATA_ITER: ocp.args.JsonRestore()}))


def leaf_paths(tree) -> dict:
    """'/'-joined key path -> leaf, alike for abstract targets and Orbax metadata trees (whose containers differ)."""
    def name(key):
        return str(next((getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)), key))
    return {"/".join(map(name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _describe(leaf) -> str:
    return "absent" if leaf is None else f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"


def first_mismatch(saved, target) -> tuple[str, str, str] | None:
    """(path, saved, target) of the first leaf whose presence, shape or dtype differs; None when all agree.
    `saved` is a step's array metadata (nothing is read), `target` the abstract tree a restore would fill."""
    saved, target = leaf_paths(saved), leaf_paths(target)
    for path in [*target, *(p for p in saved if p not in target)]:
        there, here = _describe(saved.get(path)), _describe(target.get(path))
        if there != here:
            return path, there, here
    return None


def restore_item(mgr, step: int, name: str):
    return mgr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
