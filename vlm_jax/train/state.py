"""Train state (params, optimizer state, step, rng, NaN/Inf counters) and its shardings on a mesh."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vlm_jax import sharding
from vlm_jax.errors import ConfigError
from vlm_jax.train import optimizer as opt


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied (skipped non-finite steps count too)
    params: Any  # the full nested parameter tree
    opt_state: Any  # optax state over the TRAINABLE flat {path: array} dict only
    rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
    nonfinite_streak: jax.Array  # consecutive skipped steps (int32)
    nonfinite_total: jax.Array  # all skipped steps (int32)


def scalars(step: int, rng, streak: int = 0, total: int = 0) -> dict:
    return dict(step=jnp.asarray(step, jnp.int32), rng=jnp.asarray(rng, jnp.uint32),
                nonfinite_streak=jnp.asarray(streak, jnp.int32), nonfinite_total=jnp.asarray(total, jnp.int32))


def param_shardings(abstract_boxed, mesh, rules):
    return sharding.param_shardings(abstract_boxed, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_trainable: dict, trainable_shardings: dict, mesh):
    """Moments sharded like their parameters; counters and other non-parameter leaves replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable_shardings,
                                 transform_non_params=lambda _: replicated)


def state_shardings(abstract_boxed, tx, trainable: frozenset[str], mesh, rules) -> TrainState:
    params_sh = param_shardings(abstract_boxed, mesh, rules)
    trainable_sh, _ = opt.split(params_sh, trainable)
    abstract_trainable, _ = opt.split(nn.meta.unbox(abstract_boxed), trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=replicated, params=params_sh,
                      opt_state=opt_state_shardings(tx, abstract_trainable, trainable_sh, mesh),
                      rng=replicated, nonfinite_streak=replicated, nonfinite_total=replicated)


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def init_opt_state(tx, params, trainable: frozenset[str], shardings):
    trainable_params, _ = opt.split(params, trainable)
    return jax.jit(tx.init, out_shardings=shardings)(trainable_params)


class StagePlan:
    """What a stage needs besides its config: trainable set, optimizer and state shardings."""

    def __init__(self, cfg, stage, abstract_boxed, mesh, rules):
        paths = opt.flatten(nn.meta.unbox(abstract_boxed)).keys()
        self.stage = stage
        self.trainable = opt.select_trainable(paths, stage.trainable, stage.frozen)
        if not self.trainable:
            raise ConfigError(f"stage '{stage.name}': train.trainable/frozen leave no trainable parameter")
        self.tx = opt.build_optimizer(cfg.train.optimizer, self.trainable)
        self.shardings = state_shardings(abstract_boxed, self.tx, self.trainable, mesh, rules)

    def abstract_opt_state(self, abstract_params_tree):
        trainable, _ = opt.split(abstract_params_tree, self.trainable)
        return abstract_with_shardings(jax.eval_shape(self.tx.init, trainable), self.shardings.opt_state)
