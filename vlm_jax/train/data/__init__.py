"""Training data behind one protocol (base.TrainData): the Grain pipeline, contrastive caption pairs and
generated (synthetic) batches, registered by kind."""
from __future__ import annotations

from vlm_jax.errors import ConfigError
from vlm_jax.objectives import get_objective, is_paired
from vlm_jax.registry import TRAIN_DATA
from vlm_jax.train.recipe import stage_train_config
from vlm_jax.train.data.base import SeededStream, StagedSourcesData, TrainData
from vlm_jax.train.data import contrastive, pipeline, synthetic  # noqa: F401  (they register the built-in kinds)


SYNTHETIC = "synthetic"


def open_train_data(cfg, stages, family, echo=print, hosts: int | None = None) -> TrainData:
    """Generated batches when train.synthetic.enabled, else the family's reader of data.sources
    (`Family.train_data`). `hosts`: plan for that many hosts (batch shapes only; see base.py)."""
    kind = SYNTHETIC if cfg.train.synthetic.enabled else family.train_data
    data = TRAIN_DATA.get(kind, f"model.family '{family.name}' train_data")
    for stage in stages:
        train = stage_train_config(cfg.train, stage)
        if is_paired(get_objective(cfg.model, train)) and not data.reads_pairs:
            raise ConfigError(f"stage '{stage.name}': objective '{train.objective}' reads preference pairs, which the '{kind}' "
                              f"data of model.family '{family.name}' does not give; use a generative family with "
                              "preference records in data.sources (train.synthetic.enabled generates none)")
    return data(cfg, stages, family, echo, hosts)


__all__ = ["TrainData", "StagedSourcesData", "SeededStream", "open_train_data"]
