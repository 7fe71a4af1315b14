"""The jitted train and eval steps: explicit in/out shardings from the logical rules, donated state.

Gradients are taken with respect to the trainable parameters only (frozen ones enter the loss as constants),
so XLA never builds their weight-gradient computations. A step whose loss or gradient norm is not finite
applies no update (params and optimizer state stay as they were) and is counted.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax import sharding
from vlm_jax.config import TrainConfig
from vlm_jax.families import get_family
from vlm_jax.objectives import REFERENCE_LOGPS, LossSums, get_objective, is_paired
from vlm_jax.objectives.preference import answer_logps
from vlm_jax.train import optimizer as opt
from vlm_jax.train.recipe import Stage, stage_train_config
from vlm_jax.train.state import TrainState


def batch_shardings(example_batch: dict, mesh, rules) -> dict:
    return {k: sharding.data_sharding(mesh, rules, len(v.shape)) for k, v in example_batch.items()}


def loss_sums(model, params, batch: dict, train: TrainConfig) -> LossSums:
    """The objective on `batch`."""
    family = get_family(model.config)
    return get_objective(model.config, train)(model, params, family.model_kwargs(batch), batch, train)


def _microbatches(batch: dict, n: int, group: int) -> dict:
    """(B, ...) -> (n, B/n, ...), taking every n-th group of `group` consecutive rows (a preference pair stays
    whole), so each device keeps its own rows."""
    def split(v):
        grouped = v.reshape(v.shape[0] // (n * group), n, group, *v.shape[1:])
        return jnp.swapaxes(grouped, 0, 1).reshape(n, v.shape[0] // n, *v.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def _unsplit(rows, group: int):
    """The inverse of `_microbatches` for a per-row result: (n, B/n, ...) -> (B, ...) in the batch's row order."""
    n, per = rows.shape[:2]
    grouped = rows.reshape(n, per // group, group, *rows.shape[2:])
    return jnp.swapaxes(grouped, 0, 1).reshape(n * per, *rows.shape[2:])


def make_train_step(model, train: TrainConfig, stage: Stage, tx: optax.GradientTransformation,
                    trainable: frozenset[str], state_sh: TrainState, batch_sh: dict, mesh, rules) -> Callable:
    train = stage_train_config(train, stage)
    group = 2 if is_paired(get_objective(model.config, train)) else 1
    peaks = opt.peak_learning_rates(sorted(trainable), stage.schedule.learning_rate, stage.lr_groups)
    factor_at = opt.schedule_factor(stage.schedule, stage.steps)

    def objective(trainable_params, frozen_params, batch):
        sums = loss_sums(model, opt.merge(trainable_params, frozen_params), batch, train)
        return sums.nll + train.z_loss * sums.z, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def denominator(sums):
        return jnp.maximum(sums.weight, 1.0)

    def gradients(trainable_params, frozen_params, batch):
        """Gradients of the loss per unit (sum / supervised units), and the sums."""
        if train.microbatches == 1:
            # Seeding the backward pass with 1/denominator yields the per-unit gradients directly, sparing a
            # pass that divides every gradient (its own memory-bound loop over all parameters on CPU).
            loss, backward, sums = jax.vjp(lambda t: objective(t, frozen_params, batch), trainable_params,
                                           has_aux=True)
            return backward((1.0 / denominator(sums)).astype(loss.dtype))[0], sums

        def accumulate(carry, micro):
            sums, grads = carry
            (_, s), g = grad_fn(trainable_params, frozen_params, micro)
            return (jax.tree.map(jnp.add, sums, s), jax.tree.map(jnp.add, grads, g)), None

        micro = _microbatches(batch, train.microbatches, group)
        shapes = jax.eval_shape(objective, trainable_params, frozen_params, jax.tree.map(lambda v: v[0], micro))[1]
        zero = (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), jax.tree.map(jnp.zeros_like, trainable_params))
        (sums, grads), _ = jax.lax.scan(accumulate, zero, micro)
        return jax.tree.map(lambda g: g / denominator(sums), grads), sums

    def step(state: TrainState, batch: dict):
        trainable_params, frozen_params = opt.split(state.params, trainable)
        grads, sums = gradients(trainable_params, frozen_params, batch)
        denom = denominator(sums)
        grad_norm = optax.global_norm(grads)
        loss = sums.nll / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        factor = factor_at(state.step - stage.start)
        new_trainable, new_opt_state = opt.apply_update(tx, grads, state.opt_state, trainable_params, finite, factor,
                                                        peaks)
        new_state = TrainState(
            step=state.step + 1, params=opt.merge(new_trainable, frozen_params), opt_state=new_opt_state, rng=state.rng,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
        metrics = dict(loss=loss, z_loss=sums.z / denom, grad_norm=grad_norm,
                       lr=factor * stage.schedule.learning_rate, supervised_tokens=sums.weight,
                       skipped=(~finite).astype(jnp.int32), nonfinite_streak=new_state.nonfinite_streak,
                       nonfinite_total=new_state.nonfinite_total,
                       objective={k: v / denom for k, v in sums.metrics.items()})
        return new_state, metrics

    return _under_mesh(jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                               donate_argnums=0), mesh, rules)


def _under_mesh(jitted, mesh, rules) -> Callable:
    """`jitted` called (and, as `.lower`, compiled ahead of time by `vlm-jax plan` from abstract inputs) under
    the mesh and the logical axis rules its model code reads."""
    def run(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args)
    run.lower = lower
    return run


def make_eval_step(model, train: TrainConfig, stage: Stage, params_sh, batch_sh: dict, mesh, rules) -> Callable:
    """Loss and the objective's metrics per unit, with the count of units (`supervised_tokens`) to weigh them."""
    train = stage_train_config(train, stage)

    def evaluate(params, batch):
        sums = loss_sums(model, params, batch, train)
        denom = jnp.maximum(sums.weight, 1.0)
        return dict(loss=sums.nll / denom, supervised_tokens=sums.weight,
                    objective={k: v / denom for k, v in sums.metrics.items()})

    return _under_mesh(jax.jit(evaluate, in_shardings=(params_sh, batch_sh)), mesh, rules)


def make_reference_step(model, train: TrainConfig, stage: Stage, params_sh, batch_sh: dict, mesh, rules) -> Callable:
    """(reference params, batch without the column) -> the batch's `reference_logps` column: each row's answer
    log-prob under the frozen reference, computed before the train step (which then only reads it)."""
    train = stage_train_config(train, stage)
    family = get_family(model.config)
    inputs_sh = {k: v for k, v in batch_sh.items() if k != REFERENCE_LOGPS}

    def micro_logps(params, batch):
        return answer_logps(model, params, family.model_kwargs(batch), batch, train)

    def logps(params, batch):
        """In the train step's microbatches (the pairs kept whole), so the pass's activations are the step's."""
        if train.microbatches == 1:
            return micro_logps(params, batch)
        micro = _microbatches(batch, train.microbatches, group=2)
        return _unsplit(jax.lax.map(lambda b: micro_logps(params, b), micro), group=2)

    return _under_mesh(jax.jit(logps, in_shardings=(params_sh, inputs_sh), out_shardings=batch_sh[REFERENCE_LOGPS]),
                       mesh, rules)
