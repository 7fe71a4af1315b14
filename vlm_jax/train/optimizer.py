"""AdamW over the trainable parameters only: freezing by regex, decay masks, per-group learning rates, schedules.

Parameters are addressed by '/'-joined paths ("text/decoder/layer_0/mlp/up_proj/kernel"). The optimizer sees
only the trainable subset (a flat {path: array} dict), so frozen parameters hold no optimizer state at all.
The learning rate is applied outside optax, from the global step, so a stage's schedule starts at the stage's
first step whether or not the optimizer state carries over.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vlm_jax.config import LrGroup, OptimizerConfig, ScheduleConfig

SEP = "/"


def flatten(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep=SEP)


def unflatten(flat: Mapping):
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def full_match(path: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def select_trainable(paths, trainable: Sequence[str], frozen: Sequence[str]) -> frozenset[str]:
    return frozenset(p for p in paths if full_match(p, trainable) and not full_match(p, frozen))


def split(params, trainable: frozenset[str]) -> tuple[dict, dict]:
    """Nested params -> (trainable, frozen) flat dicts."""
    flat = flatten(params)
    return ({k: v for k, v in flat.items() if k in trainable},
            {k: v for k, v in flat.items() if k not in trainable})


def merge(trainable: Mapping, frozen: Mapping):
    return unflatten({**frozen, **trainable})


def schedule_factor(cfg: ScheduleConfig, steps: int):
    """step-within-stage -> multiplier of the peak learning rate (jit-friendly)."""
    warmup = cfg.warmup_steps
    decay_steps = max(steps - warmup, 1)

    def factor(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        end = cfg.final_fraction
        if cfg.kind == "cosine":
            decay = end + (1 - end) * 0.5 * (1 + jnp.cos(math.pi * progress))
        elif cfg.kind == "linear":
            decay = 1 - (1 - end) * progress
        else:
            decay = 1.0
        return jnp.where(step < warmup, warm, decay)
    return factor


def peak_learning_rates(paths, base_lr: float, groups: Sequence[LrGroup]) -> dict[str, float]:
    """Peak learning rate per trainable path: the first matching group's, else the schedule's."""
    def lr(path):
        return next((g.learning_rate for g in groups if re.fullmatch(g.pattern, path)), base_lr)
    return {p: lr(p) for p in paths}


def build_optimizer(cfg: OptimizerConfig, trainable: frozenset[str]) -> optax.GradientTransformationExtraArgs:
    """Clip -> Adam moments -> decoupled weight decay (masked). Yields unscaled update directions.

    The state (and `init`) is optax's chain of those three; `update` is the chain's arithmetic written out, so
    that it can take the train step's guard: `update(grads, state, params, finite=False)` returns the state
    unchanged (the step keeps its parameters too). Guarding inside matters on CPU: with the guard applied to
    optax's outputs, XLA recomputes the new moments from the old ones inside the parameter update, so every
    moment buffer is copied before it is updated in place (a third of the step's optimizer time)."""
    decay_mask = {p: not full_match(p, cfg.no_decay) for p in trainable}
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)]
    init = optax.chain(*chain).init
    b1, b2, eps = cfg.b1, cfg.b2, cfg.eps

    def update(grads, state, params, finite=True):
        *clip_state, adam, decay_state = state
        if cfg.clip_norm > 0:  # as optax.clip_by_global_norm
            norm = optax.tree.norm(grads)
            grads = jax.tree.map(lambda g: jax.lax.select(norm < cfg.clip_norm, g, (g / norm.astype(g.dtype))
                                                          * cfg.clip_norm), grads)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        # As optax.scale_by_adam; the parameter update below reads the kept moments, so each moment buffer
        # is read once, by the fusion that overwrites it.
        mu = keep(jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, adam.mu), adam.mu)
        nu = keep(jax.tree.map(lambda g, v: (1 - b2) * (g ** 2) + b2 * v, grads, adam.nu), adam.nu)
        count = jnp.where(finite, optax.safe_increment(adam.count), adam.count)
        mu_c, nu_c = 1 - b1 ** count, 1 - b2 ** count

        def direction(path, m, v):
            d = (m / mu_c.astype(m.dtype)) / (jnp.sqrt(v / nu_c.astype(v.dtype) + 0.0) + eps)  # + optax's eps_root
            return d + cfg.weight_decay * params[path] if decay_mask[path] else d  # as optax.add_decayed_weights

        directions = {p: direction(p, mu[p], nu[p]) for p in mu}
        return directions, (*clip_state, adam._replace(count=count, mu=mu, nu=nu), decay_state)

    return optax.GradientTransformationExtraArgs(init, update)


def apply_learning_rates(directions: Mapping, factor, peaks: Mapping[str, float]) -> dict:
    return {p: (-peaks[p] * factor * d).astype(d.dtype) for p, d in directions.items()}


def apply_update(tx, grads, opt_state, params, finite, factor, peaks: Mapping[str, float]):
    """One step of `tx` (from `build_optimizer`) on the flat trainable params at learning rate `factor` x their
    peaks: (new params, new state), both as they were unless `finite`."""
    directions, opt_state = tx.update(grads, opt_state, params, finite=finite)
    new = optax.apply_updates(params, apply_learning_rates(directions, factor, peaks))
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, params), opt_state


def tree_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
