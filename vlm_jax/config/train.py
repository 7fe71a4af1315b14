"""The `train:` section: steps, batch, trainable/frozen regexes, optimizer, schedule, checkpoints, stages."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlm_jax.config.loader import check
from vlm_jax.errors import ConfigError
from vlm_jax.paths import user_path
from vlm_jax.registry import OBJECTIVES

NO_DECAY_DEFAULT = (r".*/bias", r".*norm[^/]*/scale", r"(.*/)?[a-z_]*gate(_attn|_ffn)?", r"(.*/)?[a-z_]*embedding")


@dataclass(frozen=True)
class LrGroup:
    pattern: str = ""  # regex over parameter paths ("vision/.*"); the first matching group wins
    learning_rate: float = 0.0  # peak learning rate for the group (same schedule shape as the stage)


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"  # after linear warmup: "cosine" | "linear" decay to final_fraction, or "constant"
    learning_rate: float = 1e-4  # peak learning rate of parameters in no lr_group
    warmup_steps: int = 0
    final_fraction: float = 0.1  # end of decay as a fraction of the peak


@dataclass(frozen=True)
class OptimizerConfig:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW), scaled by the learning rate
    no_decay: tuple[str, ...] = NO_DECAY_DEFAULT  # regexes (full match) exempt from weight decay
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables
    lr_groups: tuple[LrGroup, ...] = ()


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    max_to_keep: int = 3  # most recent committed steps kept
    keep_every: int = 0  # additionally keep every K-th step forever; 0 = none
    async_save: bool = True


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    sharding_table: bool = False  # print every parameter's logical axes, mesh spec and bytes per device


@dataclass(frozen=True)
class SyntheticDataConfig:
    """Generated batches of the family's input structure: benchmarks, plans, recipes whose data mixes do not
    exist yet. Only with `train.synthetic.enabled: true` (a run-level switch; a stage's `synthetic:` only
    changes the shapes); otherwise training reads data.sources and never generates data unasked."""
    enabled: bool = False
    seq_len: int = 32
    num_images: int = 1
    num_tiles: int = 1  # tiles per image: the "resolution" knob of a tiled encoder
    delay_s: float = 0.0  # emulated input latency per batch (benchmarks; lets tests kill a run mid-flight)


@dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimisation (train.objective: dpo) on preference pairs; see vlm_jax/objectives/preference.py."""
    beta: float = 0.1  # scale of the implicit reward beta * (log pi - log pi_ref)
    label_smoothing: float = 0.0  # conservative DPO: the share of pairs assumed mislabelled, in [0, 0.5)
    sft_weight: float = 0.0  # weight of the chosen answer's mean per-token NLL added to the loss (0 = none)


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model training (train.objective: reward, needs model.reward_head); see vlm_jax/objectives/reward.py."""
    # Weight of the squared mean score of each pair: Bradley-Terry only sees score differences, so without it
    # the scores may drift as a whole.
    drift_weight: float = 0.01


@dataclass(frozen=True)
class SweepConfig:
    """A stage trained several times from the same start, then souped (Llama 3-V's SFT: a sweep of learning rates
    or data, the top models averaged). Each variant runs in <workdir>/stages/<stage>/<i>; the soup becomes the
    run's parameters at the stage's end, with a fresh optimizer state."""
    # One mapping per variant: dotted keys of the variant's run config and their values, e.g.
    # {train.schedule.learning_rate: 3.0e-4} or {data.seed: 1}.
    variants: tuple[dict[str, Any], ...] = ()
    soup: str = "greedy"  # average | greedy | max (vlm_jax/infer/soup.py)
    eval_examples: int = 32  # held-out records of each data.eval_sources entry that rank the variants and soups


@dataclass(frozen=True)
class SampleStageConfig:
    """Rejection sampling (a stage of kind `sample`): answers of the run's current model to the stage's
    data.sources prompts, the best of `num_samples` per prompt kept (see `vlm-jax sample`)."""
    verifier: str = ""  # "exact_match": keep an answer equal to the reference; or give reward_model
    reward_model: str = ""  # an earlier `kind: reward_model` stage whose model scores the answers
    threshold: float | None = None  # reward_model: keep only a best score above this (None: every best answer)
    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    limit: int = 0  # prompts read from each source (0 = all)
    max_new_tokens: int = 16
    batch_size: int = 32
    seed: int = 0


STAGE_KINDS = ("train", "reward_model", "sample")


@dataclass(frozen=True)
class StageConfig:
    """One recipe stage; fields left unset inherit the `train:` values.

    kind `train` trains the run's model for `steps` global steps (with `sweep`: each variant does, then they are
    souped). `reward_model` trains a separate reward model for `steps` steps in <workdir>/stages/<name>, starting
    from the run's current parameters plus a zero reward head (model.reward_head; objective `reward`); `sample`
    writes a rejection-sampled SFT dataset to <workdir>/stages/<name>/data.jsonl. Neither moves the run's step;
    both run under `vlm-jax train` between the stages around them."""
    name: str = ""
    kind: str = "train"
    steps: int = 0
    trainable: tuple[str, ...] | None = None
    frozen: tuple[str, ...] | None = None
    schedule: ScheduleConfig | None = None
    lr_groups: tuple[LrGroup, ...] | None = None
    reset_optimizer: bool = False  # fresh optimizer state (always the case when the trainable set changes)
    synthetic: SyntheticDataConfig | None = None
    data: dict[str, Any] | None = None  # `data:` keys this stage overrides (deep-merged; see stage_data_config)
    objective: str | None = None  # e.g. "dpo" for a preference stage
    dpo: DpoConfig | None = None
    reward: RewardConfig | None = None
    sweep: SweepConfig | None = None
    sample: SampleStageConfig | None = None
    eval_every: int | None = None  # this stage's train.eval_every (e.g. only the preference stages evaluate)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 0  # single-stage runs: total steps (> 0). Recipes: stop at this global step (0 = all stages)
    batch_size: int = 8  # global batch
    microbatches: int = 1  # gradient accumulation: the batch is split into this many sequential microbatches
    trainable: tuple[str, ...] = (".*",)  # regexes (full match) over parameter paths
    frozen: tuple[str, ...] = ()  # regexes subtracted from `trainable`
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    # A registered objective (vlm_jax/objectives/); "" = the model family's own (next_token, contrastive).
    # "dpo" reads preference pairs and scores them against a frozen reference: the params the stage starts from.
    # "reward" trains a reward model (model.reward_head) on preference pairs (Bradley-Terry); no reference.
    objective: str = ""
    dpo: DpoConfig = DpoConfig()
    reward: RewardConfig = RewardConfig()
    loss_chunk: int = 256  # sequence positions per cross-entropy chunk (bounds the logits held at once)
    z_loss: float = 0.0  # weight of mean(logsumexp^2)
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps (each skipped) before stopping
    eval_every: int = 0  # 0 disables
    eval_batches: int = 2
    # Pipeline runs: also greedy-answer this many records of each data.eval_sources entry at every eval and log
    # exact-match accuracy as eval_accuracy/<name>/<split> (0 = loss only). Needs a cross-attention model.
    eval_examples: int = 0
    peak_flops_per_device: float = 0.0  # for MFU; 0 = the device kind's in vlm_jax/hardware.py (CPU: measured)
    profile_steps: tuple[int, ...] = ()  # [a, b]: a jax.profiler trace of steps a..b into <workdir>/profile
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    stages: tuple[StageConfig, ...] = ()
    # Fine-tuning: the first step's parameters come from here instead of a random init: a checkpoint written by
    # `vlm-jax import` or a run (its directory, or one step inside it), or a Hugging Face model directory
    # (config.json + *.safetensors, converted on the fly). Optimizer state, step, rng and data start fresh.
    # Only a new run reads it: a workdir with a committed checkpoint resumes its own state instead.
    init_from: str = ""


_SCHEDULES = ("cosine", "linear", "constant")


def _check_regexes(patterns, where: str):
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"{where}: '{p}' is not a valid regex ({e})") from None


def _validate_schedule(s: ScheduleConfig, where: str):
    check(s.kind in _SCHEDULES, f"{where}.kind: '{s.kind}' is not one of {_SCHEDULES}")
    check(s.learning_rate >= 0, f"{where}.learning_rate must be >= 0, got {s.learning_rate}")
    check(s.warmup_steps >= 0, f"{where}.warmup_steps must be >= 0, got {s.warmup_steps}")
    check(0 <= s.final_fraction <= 1, f"{where}.final_fraction must be in [0, 1], got {s.final_fraction}")


def _validate_objective(objective: str | None, dpo: DpoConfig | None, reward: RewardConfig | None, where: str):
    if objective:
        OBJECTIVES.get(objective, f"{where}.objective")
    if dpo is not None:
        check(dpo.beta > 0, f"{where}.dpo.beta must be positive, got {dpo.beta}")
        check(0 <= dpo.label_smoothing < 0.5, f"{where}.dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
        check(dpo.sft_weight >= 0, f"{where}.dpo.sft_weight must be >= 0, got {dpo.sft_weight}")
    if reward is not None:
        check(reward.drift_weight >= 0, f"{where}.reward.drift_weight must be >= 0, got {reward.drift_weight}")


def _validate_sweep(s: SweepConfig, where: str):
    check(len(s.variants) >= 2, f"{where}.variants: {len(s.variants)} given; a sweep needs at least 2")
    check(s.soup in ("average", "greedy", "max"), f"{where}.soup: '{s.soup}' is not one of average, greedy, max")
    check(s.eval_examples > 0 or s.soup == "average",
          f"{where}.eval_examples must be positive: soup '{s.soup}' ranks the variants by held-out accuracy")
    for j, variant in enumerate(s.variants):
        for key in variant:
            check(key.split(".")[0] in ("train", "data", "seed"),
                  f"{where}.variants[{j}]: '{key}' is not a train.*, data.* or seed key (a variant changes how the "
                  "stage trains, not the model or the run)")


def _validate_sample(s: SampleStageConfig, earlier: list[str], kinds: list[str], where: str):
    check(bool(s.verifier) != bool(s.reward_model),
          f"{where}: give exactly one of verifier (exact_match) and reward_model (an earlier reward_model stage)")
    check(not s.verifier or s.verifier == "exact_match", f"{where}.verifier: '{s.verifier}' is unknown; use exact_match")
    check(not s.reward_model or (s.reward_model in earlier and kinds[earlier.index(s.reward_model)] == "reward_model"),
          f"{where}.reward_model: '{s.reward_model}' is no earlier stage of kind reward_model")
    check(s.threshold is None or bool(s.reward_model), f"{where}.threshold applies to reward_model scores only")
    check(s.num_samples > 0 and s.max_new_tokens > 0 and s.batch_size > 0 and s.limit >= 0,
          f"{where}: num_samples, max_new_tokens and batch_size must be positive and limit >= 0")
    check(s.temperature > 0 or s.num_samples == 1,
          f"{where}: num_samples {s.num_samples} at temperature 0 draws one greedy answer each time; set temperature > 0")


def validate_train(t: TrainConfig):
    check(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")  # > 0 without stages: checked by `train`
    check(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    check(t.microbatches > 0, f"train.microbatches must be positive, got {t.microbatches}")
    check(t.loss_chunk > 0, f"train.loss_chunk must be positive, got {t.loss_chunk}")
    check(t.eval_examples >= 0, f"train.eval_examples must be >= 0, got {t.eval_examples}")
    check(t.max_nonfinite_steps > 0, f"train.max_nonfinite_steps must be positive, got {t.max_nonfinite_steps}")
    check(t.checkpoint.every_steps > 0, f"train.checkpoint.every_steps must be positive, got {t.checkpoint.every_steps}")
    check(t.checkpoint.max_to_keep > 0, f"train.checkpoint.max_to_keep must be positive, got {t.checkpoint.max_to_keep}")
    check(t.log.every_steps > 0, f"train.log.every_steps must be positive, got {t.log.every_steps}")
    check(not t.profile_steps or (len(t.profile_steps) == 2 and 0 < t.profile_steps[0] < t.profile_steps[1]),
          f"train.profile_steps must be [] or two steps [a, b] with 0 < a < b, got {list(t.profile_steps)}")
    check(t.synthetic.seq_len > 1, f"train.synthetic.seq_len must be > 1, got {t.synthetic.seq_len}")
    _validate_schedule(t.schedule, "train.schedule")
    _validate_objective(t.objective, t.dpo, t.reward, "train")
    if t.init_from:
        user_path(t.init_from, "train.init_from")  # an unknown scheme stops here, named
    _check_regexes(t.trainable + t.frozen + t.optimizer.no_decay, "train")
    _check_regexes([g.pattern for g in t.optimizer.lr_groups], "train.optimizer.lr_groups")
    names = [st.name for st in t.stages]
    for i, st in enumerate(t.stages):
        where = f"train.stages[{i}]"
        check(st.kind in STAGE_KINDS, f"{where}.kind: '{st.kind}' is not one of {STAGE_KINDS}")
        check(i > 0 or st.kind == "train", f"{where} is a '{st.kind}' stage, which needs a model trained by an earlier "
              "stage; put a train stage first")
        check(st.kind == "sample" or st.steps > 0, f"{where}.steps must be positive, got {st.steps}")
        check(st.eval_every is None or st.eval_every >= 0, f"{where}.eval_every must be >= 0, got {st.eval_every}")
        check(st.kind != "sample" or (st.steps == 0 and st.sample is not None),
              f"{where} is a sample stage: give its `sample:` settings and no steps")
        check(st.sample is None or st.kind == "sample", f"{where}.sample applies to `kind: sample` stages only")
        check(st.sweep is None or st.kind == "train", f"{where}.sweep applies to `kind: train` stages only")
        check(st.kind != "reward_model" or st.objective in (None, "reward"),
              f"{where} trains a reward model (objective reward); remove objective '{st.objective}'")
        check(st.kind == "train" or st.name, f"{where} ({st.kind}) needs a name: its output lives in <workdir>/stages/<name>")
        check(not st.name or names.index(st.name) == i, f"{where}.name '{st.name}' is already train.stages["
              f"{names.index(st.name)}]'s; stage names must be unique")
        if st.sweep is not None:
            _validate_sweep(st.sweep, f"{where}.sweep")
        if st.sample is not None:
            _validate_sample(st.sample, names[:i], [s.kind for s in t.stages[:i]], f"{where}.sample")
        if st.schedule is not None:
            _validate_schedule(st.schedule, f"{where}.schedule")
        _check_regexes((st.trainable or ()) + (st.frozen or ()), where)
        _validate_objective(st.objective, st.dpo, st.reward, where)
        _check_regexes([g.pattern for g in st.lr_groups or ()], f"{where}.lr_groups")
