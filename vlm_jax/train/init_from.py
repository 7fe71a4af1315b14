"""`train.init_from`: a new run's parameters from a checkpoint (`vlm-jax import`'s output or a run's) or a Hugging
Face directory converted on the fly, placed straight onto the mesh with the run's shardings (no device and no
host holds the whole model). `open_init_source` checks the source against `model:` from metadata alone (array
shapes and dtypes, the source's model config), so a mismatch stops before anything is read or written."""
from __future__ import annotations

from dataclasses import replace

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np

from vlm_jax.config import ModelConfig, to_dict
from vlm_jax.convert import HFWeights, config_from_hf
from vlm_jax.errors import UserError
from vlm_jax.families import abstract_params, build_model
from vlm_jax.objectives.reward import REWARD_HEAD
from vlm_jax.paths import user_path
from vlm_jax.train import checkpoint
from vlm_jax.train.state import abstract_with_shardings

# How the model runs rather than what it is: these may differ from the source's (an HF directory is converted
# into the run's settings; a checkpoint's param_dtype is its arrays' dtype, compared leaf by leaf).
RUNTIME = ("dtype", "param_dtype", "scan_layers", "remat_policy", "vision_remat_policy", "attention_impl")
# Initial values of a random init, which loaded parameters replace.
INIT_ONLY = ("text.cross_attention_gate_init", "logit_scale_init", "logit_bias_init")


class InitFromError(UserError):
    pass


def differing_model_field(theirs: ModelConfig, ours: ModelConfig) -> tuple[str, object, object] | None:
    """The first model config field (dotted) that changes what the model computes, with both values. Equal shapes
    do not make equal models: e.g. which vision layers feed the projector, or rope_theta."""
    a, b = (flax.traverse_util.flatten_dict(to_dict(c), sep=".") for c in (theirs, ours))
    for key in [*b, *(k for k in a if k not in b)]:
        if key.split(".")[0] not in RUNTIME and key not in INIT_ONLY and a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def _without_head(tree) -> dict:
    return {**tree, "text": {k: v for k, v in tree["text"].items() if k != REWARD_HEAD}}


class InitSource:
    """A checked `train.init_from`; `params(shardings)` reads it onto the mesh. A reward model
    (model.reward_head) may start from a source without the head (an SFT or imported checkpoint): the head alone
    starts fresh, at zero like a random init's."""

    def __init__(self, source: str, model: ModelConfig, abstract):
        self.path = user_path(source, "train.init_from")
        where = f"train.init_from {source}"
        if not self.path.exists():
            raise InitFromError(f"{where}: not found; give a directory written by `vlm-jax import` or `vlm-jax "
                                "train` (or one step inside it), or a Hugging Face model directory")
        self.hf = (self.path / "config.json").is_file()
        self.kind = "Hugging Face directory" if self.hf else "checkpoint"
        try:
            if self.hf:
                theirs = config_from_hf(self.path, **{k: getattr(model, k) for k in RUNTIME})
                saved = nn.meta.unbox(abstract_params(build_model(theirs)))
            else:
                theirs = checkpoint.read_meta(str(self.path))[0].model
                saved = checkpoint.params_metadata(str(self.path))
        except UserError as e:
            raise InitFromError(f"{where}: {e}") from None
        self.fresh_head = model.reward_head and not any(
            p.startswith(f"text/{REWARD_HEAD}/") for p in checkpoint.leaf_paths(saved))
        self.abstract, self.where = abstract, where
        if self.fresh_head:
            abstract, model = _without_head(abstract), replace(model, reward_head=False)
        diff = checkpoint.first_mismatch(saved, abstract)
        if diff:
            path, there, here = diff
            raise InitFromError(f"{where} does not fit the config: params/{path} is {there} there but {here} in "
                                "model:; make model: describe the same architecture (or drop train.init_from)")
        field = differing_model_field(theirs, model)
        if field:
            key, there, here = field
            raise InitFromError(f"{where} does not fit the config: model.{key} is {there!r} there but {here!r} in "
                                "model:; set it to the source's value")
        try:  # an HF directory's tensor names and shapes, from the safetensors headers
            self.weights = HFWeights(self.path, theirs) if self.hf else None
        except UserError as e:
            raise InitFromError(f"{where}: {e}") from None

    def params(self, shardings):
        """The parameters as global arrays placed by `shardings` (a tree like the params')."""
        if not self.fresh_head:
            return self._read(self.abstract, shardings)
        params = self._read(_without_head(self.abstract), _without_head(shardings))
        head = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s),
                            self.abstract["text"][REWARD_HEAD], shardings["text"][REWARD_HEAD])
        return {**params, "text": {**params["text"], REWARD_HEAD: head}}

    def _read(self, abstract, shardings):
        if self.weights:
            return self.weights.place(shardings)
        try:
            return checkpoint.restore_params(str(self.path), abstract_with_shardings(abstract, shardings))
        except UserError as e:
            raise InitFromError(f"{self.where}: {e}") from None
