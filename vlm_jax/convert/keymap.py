"""Declarative checkpoint conversion: a key map of (our path, HF key, transform) rules over a per-layer view.

Our parameter trees stack scanned layers on a leading axis; `Stack` rules describe how a stacked subtree
unrolls into per-layer paths, so key maps are written per layer, like HF's, and do not care about scanning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from vlm_jax.errors import ConversionError


@dataclass(frozen=True)
class Transform:
    """to_ours(hf_array, our_shape) and to_hf(our_array); hf_shape(our_shape) checks shapes without data."""
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


COPY = Transform(lambda a, s: a.reshape(s), lambda a: a, lambda s: s)
# Tables HF keeps flat: (rows, A*B*...) <-> ours (rows, A, B, ...).
FLATTEN_TAIL = Transform(lambda a, s: a.reshape(s), lambda a: a.reshape(a.shape[0], -1),
                         lambda s: (s[0], math.prod(s[1:])))
# torch Conv2d (O, I, kh, kw) <-> flax (kh, kw, I, O).
CONV = Transform(lambda a, s: a.transpose(2, 3, 1, 0).reshape(s), lambda a: a.transpose(3, 2, 0, 1),
                 lambda s: (s[3], s[2], s[0], s[1]))


# Biases of projections whose outputs we keep split, e.g. (heads, head_dim) or (3, heads, head_dim).
FLAT = Transform(lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (math.prod(s),))


def reshaped(hf_shape: tuple) -> Transform:
    """Same values, HF's shape (e.g. CLIP's scalar logit_scale, kept as (1,) here like SigLIP's)."""
    return Transform(lambda a, s: a.reshape(s), lambda a: a.reshape(hf_shape), lambda s: hf_shape)


def linear(contract_dims: int = 1) -> Transform:
    """torch Linear (out, in) <-> our kernel (*in_dims, *out_dims) with `contract_dims` input dims
    (2 for attention output projections whose input is (heads, head_dim))."""
    def split(s):
        return math.prod(s[:contract_dims]), math.prod(s[contract_dims:])
    return Transform(lambda a, s: a.T.reshape(s), lambda a: a.reshape(split(a.shape)).T,
                     lambda s: split(s)[::-1])


LINEAR, LINEAR_HEADS_IN = linear(1), linear(2)


def layer_norm(ours: str, hf: str) -> list[tuple[str, str, Transform]]:
    """(ours, hf, transform) entries of a LayerNorm: scale <-> weight, bias <-> bias."""
    return [(f"{ours}/scale", f"{hf}.weight", COPY), (f"{ours}/bias", f"{hf}.bias", COPY)]


# The fc1 -> act -> fc2 MLP with biases of every ViT layer (Mllama, CLIP, SigLIP and its pooling head).
FC_MLP = [entry for fc in ("fc1", "fc2")
          for entry in ((f"mlp/{fc}/kernel", f"mlp.{fc}.weight", LINEAR), (f"mlp/{fc}/bias", f"mlp.{fc}.bias", COPY))]


@dataclass(frozen=True)
class Rule:
    ours: str  # '/'-joined path in the per-layer view
    hf: str
    transform: Transform = COPY


@dataclass(frozen=True)
class Stack:
    """Our subtree `prefix` holds `count` layers stacked on axis 0; layer b is `layer_path(b)` per-layer."""
    prefix: str
    count: int
    layer_path: Callable[[int], str]


def flatten(tree) -> dict[str, object]:
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, object]):
    return traverse_util.unflatten_dict(flat, sep="/")


def stack_of(path: str, stacks: list[Stack]) -> Stack | None:
    return next((s for s in stacks if path.startswith(s.prefix)), None)


def per_layer_shapes(shapes: dict[str, tuple], stacks: list[Stack]) -> dict[str, tuple]:
    out = {}
    for path, shape in shapes.items():
        stack = stack_of(path, stacks)
        if stack is None:
            out[path] = tuple(shape)
        else:
            out.update({stack.layer_path(b) + path[len(stack.prefix):]: tuple(shape[1:]) for b in range(stack.count)})
    return out


def check_hf(hf: dict[str, np.ndarray], rules: list[Rule], shapes: dict[str, tuple], source: str):
    """Every rule finds its key with the expected shape, and every HF tensor is used. `shapes` is our per-layer
    view's shapes. Reads shapes only, no tensor data."""
    missing = [r.hf for r in rules if r.hf not in hf]
    if missing:
        raise ConversionError(f"{source}: {len(missing)} weights the config needs are missing, e.g. "
                              f"'{missing[0]}'; the checkpoint does not match its config.json")
    unused = sorted(set(hf) - {r.hf for r in rules})
    if unused:
        raise ConversionError(f"{source}: {len(unused)} weights are not part of this architecture, e.g. "
                              f"'{unused[0]}'; check config.json's layer counts and model_type")
    for r in rules:
        expected = tuple(r.transform.hf_shape(shapes[r.ours]))
        if tuple(hf[r.hf].shape) != expected:
            raise ConversionError(f"{source}: weight '{r.hf}' has shape {tuple(hf[r.hf].shape)} but config.json "
                                  f"implies {expected}")
        if hf[r.hf].dtype.kind in "biu":
            raise ConversionError(f"{source}: weight '{r.hf}' has the integer dtype {hf[r.hf].dtype} (quantized or "
                                  "corrupt?); convert from a floating-point checkpoint")


def rule_to_ours(rule: Rule, hf_array, shape: tuple, dtype, source: str) -> np.ndarray:
    out = np.asarray(rule.transform.to_ours(np.asarray(hf_array), shape), dtype=dtype)
    if bad := int(out.size - np.count_nonzero(np.isfinite(out))):
        raise ConversionError(f"{source}: weight '{rule.hf}' holds {bad} NaN/Inf values of {out.size}; the "
                              "checkpoint is corrupt, re-download or re-save it")
    return out


def ours_to_hf(flat: Mapping[str, object], shapes: dict[str, tuple], stacks: list[Stack], rules: list[Rule],
               dtype) -> tuple[list[tuple[str, tuple, np.dtype]], Iterator[tuple[str, np.ndarray]]]:
    """HF tensors in the order of our parameters `shapes` (stacked): (every tensor's name, shape and dtype, known
    before anything is read; an iterator of (name, array) that reads each of our parameters `flat[path]` once,
    with np.asarray, when its first tensor is due). A reader that loads on access thus holds one parameter (a
    scanned stack whole) at a time."""
    by_ours: dict[str, list[Rule]] = {}
    for r in rules:
        by_ours.setdefault(r.ours, []).append(r)
    order = []  # (our path, [(layer or None, rule, per-layer shape)])
    for path, shape in shapes.items():
        stack = stack_of(path, stacks)
        layers = [(None, path, shape)] if stack is None else \
            [(b, stack.layer_path(b) + path[len(stack.prefix):], shape[1:]) for b in range(stack.count)]
        order.append((path, [(b, r, s) for b, per_layer, s in layers for r in by_ours.pop(per_layer, ())]))
    if by_ours:
        raise ConversionError(f"key map rule for '{next(iter(by_ours))}' names no parameter of the model")
    unmapped = [path for path, items in order if not items]
    if unmapped:  # writing the rest would be a checkpoint that silently lacks a trained parameter
        raise ConversionError(f"parameter '{unmapped[0]}' has no Hugging Face key"
                              f"{f' (nor do {len(unmapped) - 1} more)' if len(unmapped) > 1 else ''}: this "
                              "model cannot be exported to the Hugging Face layout")
    dtype = np.dtype(dtype)
    layout = [(r.hf, tuple(r.transform.hf_shape(tuple(s))), dtype) for _, items in order for _, r, s in items]

    def tensors():
        for path, items in order:
            arr = np.asarray(flat[path])
            for b, r, _ in items:
                # np.asarray(order="C"), not ascontiguousarray, which turns 0-d tensors (CLIP's logit_scale) into 1-d.
                hf = r.transform.to_hf(arr if b is None else arr[b]).astype(dtype, copy=False)
                yield r.hf, np.asarray(hf, order="C")
    return layout, tensors()
