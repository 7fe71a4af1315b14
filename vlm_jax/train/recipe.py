"""Recipe stages resolved against the `train:` defaults: each stage is a contiguous range of global steps.

A `train` stage's range is its steps (a sweep's too: the soup lands at its end); a `reward_model` or `sample`
stage takes no global step (an empty range where it sits), since it leaves the run's model as it is."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vlm_jax.config import (DpoConfig, LrGroup, RewardConfig, SampleStageConfig, ScheduleConfig, StageConfig,
                            SweepConfig, SyntheticDataConfig, TrainConfig)
from vlm_jax.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    start: int  # first global step of the stage
    steps: int  # global steps it takes (0 for a reward_model or sample stage)
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    schedule: ScheduleConfig
    lr_groups: tuple[LrGroup, ...]
    reset_optimizer: bool
    synthetic: SyntheticDataConfig
    data: Any
    objective: str  # "" = the model family's
    dpo: DpoConfig
    reward: RewardConfig
    kind: str = "train"
    eval_every: int = 0  # held-out evaluation at every multiple of this global step (0 = none)
    own_steps: int = 0  # the steps a stage trains in its own run (a sweep variant's, a reward model's)
    sweep: SweepConfig | None = None
    sample: SampleStageConfig | None = None

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def trains_in_place(self) -> bool:
        """Whether the run's own train loop trains this stage (no sweep, reward model or sampling)."""
        return self.kind == "train" and self.sweep is None


def resolve_stages(train: TrainConfig) -> list[Stage]:
    if not train.stages:
        if train.steps <= 0:
            raise ConfigError("train.steps must be positive (or give train.stages); e.g. train.steps=100")
        configs = [StageConfig(name="train", steps=train.steps)]
    else:
        configs = list(train.stages)
    stages, start = [], 0
    for i, s in enumerate(configs):
        steps = s.steps if s.kind == "train" else 0
        stages.append(Stage(
            index=i, name=s.name or f"stage{i}", start=start, steps=steps, kind=s.kind, own_steps=s.steps,
            sweep=s.sweep, sample=s.sample,
            trainable=s.trainable if s.trainable is not None else train.trainable,
            frozen=s.frozen if s.frozen is not None else train.frozen,
            schedule=s.schedule or train.schedule,
            lr_groups=s.lr_groups if s.lr_groups is not None else train.optimizer.lr_groups,
            reset_optimizer=s.reset_optimizer, synthetic=s.synthetic or train.synthetic, data=s.data,
            objective=s.objective if s.objective is not None else train.objective, dpo=s.dpo or train.dpo,
            reward=s.reward or train.reward,
            eval_every=s.eval_every if s.eval_every is not None else train.eval_every))
        start += steps
    return stages


def total_steps(train: TrainConfig, stages: list[Stage]) -> int:
    """Where the run stops: the last stage's end, or `train.steps` when a recipe is cut short."""
    end = stages[-1].end
    return min(train.steps, end) if train.stages and train.steps else end


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs global step `step` (the last one that takes steps once every stage is done)."""
    return next((s for s in stages if s.start <= step < s.end), [s for s in stages if s.steps][-1])


def stage_train_config(train: TrainConfig, stage: Stage) -> TrainConfig:
    """`train` with the stage's objective settings, as the objective reads them."""
    return replace(train, objective=stage.objective, dpo=stage.dpo, reward=stage.reward)
