"""Typed configs: one schema (the dataclasses of each section, in this package's modules) and one loader.

`load_config(path, overrides)` reads YAML with `base:` inheritance, applies dotted overrides, builds the
dataclasses strictly and validates them; every mistake is a one-line `ConfigError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from vlm_jax.config.data import (SAMPLED_DATA_FILE, SAMPLED_PAIRS_FILE, STAGE_OUTPUTS, DataConfig, ImageConfig,
                                 PackingConfig, ShapeConfig, SourceConfig, WorkerConfig, validate_data)
from vlm_jax.config.loader import (apply_overrides, check, deep_merge, from_dict, parse_override, read_yaml,
                                   to_dict)
from vlm_jax.config.mesh import DistributedConfig, MeshConfig, validate_mesh
from vlm_jax.config.model import (ConnectorConfig, MllamaVisionConfig, ModelConfig, RopeScaling, TextConfig,
                                  TextEncoderConfig, ViTConfig, load_model_config, validate_model)
from vlm_jax.config.train import (STAGE_KINDS, CheckpointConfig, DpoConfig, LogConfig, LrGroup, OptimizerConfig,
                                  RewardConfig, SampleStageConfig, ScheduleConfig, StageConfig, SweepConfig,
                                  SyntheticDataConfig, TrainConfig, validate_train)
from vlm_jax.errors import ConfigError
from vlm_jax.paths import user_path


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    train: TrainConfig = TrainConfig()
    # What training reads: data.sources, through the family's reader (the Grain pipeline, caption pairs). The
    # GLOBAL batch is then data.shapes.batch_size (rows per process) x the process count, of data.shapes.seq_len
    # tokens (train.microbatches must divide it); train.synthetic.enabled generates train.batch_size rows of
    # train.synthetic's shapes instead. Stages' `data` mappings deep-merge into this section for that stage. data.tokenizer "" with embedded sources: a
    # sentencepiece tokenizer is trained once on the embedded tasks' texts and kept as <workdir>/tokenizer.model.
    data: DataConfig = DataConfig(sources=())
    seed: int = 0
    workdir: str = ""


def validate(cfg: Config):
    validate_model(cfg.model)
    if cfg.workdir:
        user_path(cfg.workdir, "workdir")  # an unknown scheme stops here, named
    validate_mesh(cfg.mesh, cfg.distributed)
    validate_train(cfg.train)
    # A reward_model stage trains its own model, which has the head.
    objectives = {cfg.train.objective, *(stage.objective for stage in cfg.train.stages if stage.kind == "train")}
    check("reward" not in objectives or cfg.model.reward_head,
          "train.objective 'reward' trains the scalar reward head, which the model lacks; set model.reward_head=true")
    if cfg.train.synthetic.enabled:
        check(not cfg.data.sources, "train.synthetic.enabled generates the batches, but data.sources is set; "
              "remove data.sources or set train.synthetic.enabled=false")
        for i, stage in enumerate(cfg.train.stages):
            check(not stage.data, f"train.stages[{i}].data overrides data sources, but train.synthetic.enabled reads "
                  f"none; remove it (stages vary generated batches with train.stages[{i}].synthetic)")
    if cfg.data.sources:
        validate_data(cfg.data)
        _check_stage_outputs(cfg.data, (), "data")
        for i, stage in enumerate(cfg.train.stages):
            where = f"train.stages[{i}].data"
            samples = tuple(s.name for s in cfg.train.stages[:i] if s.kind == "sample")
            _check_stage_outputs(stage_data_config(cfg.data, stage.data, where), samples, where)


# Recipe stages that are no training of the run's model keep their outputs in <workdir>/stages/<name>/.
STAGES_DIR = "stages"


def stage_output_dir(workdir: str, stage: str):
    return user_path(workdir, "workdir") / STAGES_DIR / stage


def _check_stage_outputs(data: DataConfig, samples: tuple[str, ...], where: str):
    for kind in ("sources", "eval_sources"):
        for i, source in enumerate(getattr(data, kind)):
            check(not source.stage or source.stage in samples,
                  f"{where}.{kind}[{i}].stage: '{source.stage}' is no earlier stage of kind sample"
                  + (f" (those are: {', '.join(samples)})" if samples else ""))


def with_stage_outputs(cfg: Config) -> Config:
    """`cfg` with every stage source that reads a sample stage's output (`stage: NAME`) given its path in the
    workdir; unchanged without a workdir (a plan reads no data)."""
    if not cfg.workdir:
        return cfg

    def resolved(source: dict) -> dict:
        if not source.get("stage") or source.get("path"):
            return source
        output = STAGE_OUTPUTS[source.get("stage_output", SourceConfig.stage_output)]
        return {**source, "path": str(stage_output_dir(cfg.workdir, source["stage"]) / output)}

    stages = tuple(replace(st, data={**st.data, **{k: [resolved(s) for s in st.data[k]] for k in ("sources", "eval_sources")
                                                    if isinstance(st.data.get(k), list)}})
                   if st.data else st for st in cfg.train.stages)
    return replace(cfg, train=replace(cfg.train, stages=stages))


def stage_data_config(data: DataConfig, overrides: dict | None, where: str = "stage data") -> DataConfig:
    """`data` with a stage's overrides deep-merged in, strictly parsed and validated."""
    if not overrides:
        return data
    merged = from_dict(DataConfig, deep_merge(to_dict(data), overrides), where)
    validate_data(merged, where)
    return merged


def load_config(path: str | None = None, overrides: list[str] = (), cls=Config, require: tuple[str, ...] = ()):
    """`require` names sections that must be written out (a default model is a guess, e.g. for `train`)."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    for section in require:
        check(section in data, f"{path or 'the overrides'}: no `{section}:` section; add one, or a `base:` that "
              f"has it (e.g. a preset of configs/models/); no default {section} is assumed")
    if cls is Config and isinstance(data.get("data"), dict) and "sources" not in data["data"]:
        data["data"] = {**data["data"], "sources": []}  # the root default: no sources
    cfg = from_dict(cls, data)
    validate(cfg)
    return with_stage_outputs(cfg) if cls is Config else cfg


__all__ = [
    "Config", "ConfigError", "load_config", "validate", "stage_data_config", "with_stage_outputs", "stage_output_dir",
    "STAGES_DIR", "SAMPLED_DATA_FILE", "SAMPLED_PAIRS_FILE", "STAGE_KINDS", "SweepConfig", "SampleStageConfig", "load_model_config", "from_dict",
    "to_dict", "deep_merge", "parse_override", "apply_overrides", "read_yaml", "check",
    "ModelConfig", "MllamaVisionConfig", "TextConfig", "ViTConfig", "ConnectorConfig", "TextEncoderConfig",
    "RopeScaling", "MeshConfig", "DistributedConfig", "TrainConfig", "DpoConfig", "RewardConfig", "StageConfig",
    "ScheduleConfig", "OptimizerConfig", "LrGroup", "CheckpointConfig", "LogConfig", "SyntheticDataConfig",
    "DataConfig", "SourceConfig", "ImageConfig", "ShapeConfig", "PackingConfig", "WorkerConfig", "validate_data",
    "validate_model", "validate_train",
]
