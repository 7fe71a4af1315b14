"""The training loop: restore-or-init, stage transitions, logging, checkpoints, SIGTERM/Ctrl-C, NaN/Inf stop.

Running again in the same workdir resumes from the newest committed checkpoint (params, optimizer state,
step, rng and data-iterator state), on whatever mesh the current config and devices give.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import hardware, host_memory, sharding
from vlm_jax.config import Config, ModelConfig, from_dict
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.paths import check_writable, user_path
from vlm_jax.families import abstract_params, get_family, init_params
from vlm_jax.models.attention import resolved_model
from vlm_jax.objectives import REFERENCE_LOGPS, get_objective, is_paired, needs_reference
from vlm_jax.registry import EVALUATORS
from vlm_jax.train import checkpoint, flops
from vlm_jax.train import optimizer as opt
from vlm_jax.train.data import open_train_data
from vlm_jax.train.init_from import InitSource, differing_model_field
from vlm_jax.train.metrics import MetricsLogger
from vlm_jax.train.preemption import StopSignal
from vlm_jax.train.profiler import StepProfiler
from vlm_jax.train.recipe import Stage, resolve_stages, stage_at, stage_train_config, total_steps
from vlm_jax.train.state import StagePlan, TrainState, abstract_with_shardings, init_opt_state, scalars
from vlm_jax.train.step import batch_shardings, make_eval_step, make_reference_step, make_train_step

# Logged as eval_accuracy/<source> when train.eval_examples > 0 (registered by vlm_jax/infer/evaluate.py).
ANSWER_ACCURACY = "answer_accuracy"


class NonFiniteError(UserError):
    pass


@dataclass
class RunResult:
    state: TrainState
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, every step of this run
    stopped_by_signal: bool = False


class Trainer:
    def __init__(self, cfg: Config, devices=None, echo=print):
        if not cfg.workdir:
            raise ConfigError("workdir is not set; pass workdir=DIR (checkpoints and metrics go there)")
        check_writable(user_path(cfg.workdir, "workdir"), "workdir", folder=True)
        self.cfg, self.echo = cfg, echo
        self.stages = resolve_stages(cfg.train)
        self.end = total_steps(cfg.train, self.stages)
        self.ckpt_dir = user_path(cfg.workdir, "workdir") / "checkpoints"
        # vlm_jax/recipe.py trains a sweep, with this run cut at its start, and commits the soup at its end.
        sweeps = [s for s in self.stages if s.sweep and s.start < self.end]
        committed = max(checkpoint.committed_steps(self.ckpt_dir), default=0) if sweeps else 0
        for stage in sweeps:
            if committed < stage.end:
                raise ConfigError(f"stage '{stage.name}' (step {stage.start}) sweeps {len(stage.sweep.variants)} "
                                  "variants, which the recipe runner trains; run the config with `vlm-jax train`")
        self.family = get_family(cfg.model)
        # Data errors before the model is built; only the stages this run trains (a later stage may read what the
        # recipe has not written yet).
        self.data = open_train_data(cfg, [s for s in self.stages if s.trains_in_place and s.start < self.end]
                                    or self.stages[:1], self.family, echo)
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        self.rules = sharding.load_rules(cfg.mesh.rules)
        self.model = self.family.build(resolved_model(cfg.model, jax.default_backend(), cfg.data.packing.enabled,
                                                      echo))
        self.abstract_boxed = abstract_params(self.model)
        self.abstract_params = nn.meta.unbox(self.abstract_boxed)
        self.plans = {}
        # A DPO stage's frozen reference params (never updated) and its jitted answer log-probs.
        self.reference = self.reference_logps = None

    def plan(self, stage: Stage) -> StagePlan:
        if stage.index not in self.plans:
            self.plans[stage.index] = StagePlan(self.cfg, stage, self.abstract_boxed, self.mesh, self.rules)
        return self.plans[stage.index]

    # ------------------------------------------------------------------------------ state

    def init_source(self) -> InitSource | None:
        """`train.init_from`, checked against the model (metadata only), when this run starts fresh."""
        if not self.cfg.train.init_from or checkpoint.committed_steps(self.ckpt_dir):
            return None
        return InitSource(self.cfg.train.init_from, self.cfg.model, self.abstract_params)

    def fresh_state(self, init: InitSource | None = None) -> TrainState:
        """Step 0: parameters from `init` or a random init, a fresh optimizer state, rng and counters."""
        plan = self.plan(self.stages[0])
        if init is not None:
            params = init.params(plan.shardings.params)
            self.echo(f"parameters from the {init.kind} {self.cfg.train.init_from} (train.init_from); optimizer "
                      "state, step and data start fresh")
            if init.fresh_head:
                self.echo("the source has no reward head (model.reward_head): text/reward_head starts at zero")
        else:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                params = jax.jit(lambda rng: nn.meta.unbox(init_params(self.model, rng)),
                                 out_shardings=plan.shardings.params)(jax.random.PRNGKey(self.cfg.seed))
        opt_state = init_opt_state(plan.tx, params, plan.trainable, plan.shardings.opt_state)
        return TrainState(params=params, opt_state=opt_state, **self._place_scalars(
            scalars(0, jax.random.PRNGKey(self.cfg.seed + 1))))

    def _place_scalars(self, values: dict) -> dict:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return {k: jax.device_put(v, replicated) for k, v in values.items()}

    def restore(self, mgr) -> tuple[TrainState, int, dict] | None:
        """(state, stage whose optimizer state it holds, data_iter) of the newest readable committed step; None
        when nothing was committed. A damaged step falls back to the previous one with a warning; a step that
        does not fit the current config, or no readable step at all, stops with one line (never a fresh start
        over an existing run)."""
        for name in checkpoint.incomplete_steps(self.ckpt_dir):
            self.echo(f"warning: ignoring incomplete checkpoint {name} (an interrupted save)")
        steps = sorted(mgr.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:  # metadata only: no array is read yet
                owner = checkpoint.restore_item(mgr, step, checkpoint.TRAIN_STATE)["stage"]
                written_by = from_dict(Config, checkpoint.restore_item(mgr, step, checkpoint.META)["config"]).model
                saved = mgr.item_metadata(step)
                saved = {k: saved[k] for k in (checkpoint.PARAMS, checkpoint.OPT_STATE)}
            except Exception as e:  # noqa: BLE001  (a damaged step must not stop the fallback)
                self._unreadable(step, e, steps[i + 1:])
                continue
            plan = self._check_fits(step, owner, saved, written_by)
            try:
                abstract = abstract_with_shardings(self.abstract_params, plan.shardings.params)
                items = checkpoint.restore_train(mgr, step, abstract, plan.abstract_opt_state(self.abstract_params))
            except Exception as e:  # noqa: BLE001
                self._unreadable(step, e, steps[i + 1:])
                continue
            meta = items[checkpoint.TRAIN_STATE]
            state = TrainState(params=items[checkpoint.PARAMS], opt_state=items[checkpoint.OPT_STATE],
                               **self._place_scalars(scalars(meta["step"], np.asarray(meta["rng"], np.uint32),
                                                             meta["nonfinite_streak"], meta["nonfinite_total"])))
            return state, owner, items[checkpoint.DATA_ITER]
        return None

    def _unreadable(self, step: int, error: Exception, older: list[int]):
        text = str(error).strip().splitlines()
        reason = type(error).__name__ + (f": {text[0][:160]}" if text else "")
        if not older:
            raise checkpoint.CheckpointError(
                f"checkpoint step {step} in {self.ckpt_dir} is unreadable ({reason}) and no earlier committed step "
                "is left; repair or move that directory away (training will not start fresh over a run)")
        self.echo(f"warning: checkpoint step {step} is unreadable ({reason}); falling back to step {older[0]}")

    def _check_fits(self, step: int, owner: int, saved: dict, written_by: ModelConfig) -> StagePlan:
        """The owner stage's plan, when `saved` (the step's array metadata) has exactly the current config's
        parameter and optimizer-state shapes and dtypes, and the model config that wrote it computes the same
        model; else one line naming the first difference."""
        where = f"checkpoint step {step} in {self.ckpt_dir}"
        if owner >= len(self.stages):
            raise checkpoint.CheckpointError(f"{where} was written in stage {owner} but the config has "
                                             f"{len(self.stages)} stage(s); restore train.stages or use a new workdir")
        plan = self.plan(self.stages[owner])
        targets = {checkpoint.PARAMS: (self.abstract_params, "the model config (model.*) differs from the run's"),
                   checkpoint.OPT_STATE: (plan.abstract_opt_state(self.abstract_params),
                                          f"train.trainable/frozen or train.optimizer of stage '{plan.stage.name}' "
                                          "differ from the run's (a new recipe stage may change them)")}
        for item, (target, why) in targets.items():
            diff = checkpoint.first_mismatch(saved[item], target)
            if diff:
                path, there, here = diff
                raise checkpoint.CheckpointError(
                    f"{where} does not fit the config: {item}/{path} is {there} there but {here} now; {why}; "
                    "run with the settings that wrote it or use a new workdir")
        field = differing_model_field(written_by, self.cfg.model)
        if field:
            key, there, here = field
            raise checkpoint.CheckpointError(
                f"{where} was trained with model.{key}={there!r} but the config says {here!r}; set "
                f"model.{key}={there!r} to resume it (or use a new workdir)")
        return plan

    def enter_stage(self, state: TrainState, owner: int, stage: Stage) -> TrainState:
        """Carry the optimizer state into `stage`, or start a fresh one (requested, or the trainable set moved)."""
        plan, previous = self.plan(stage), self.plan(self.stages[owner])
        if owner == stage.index or (not stage.reset_optimizer and previous.trainable == plan.trainable):
            return state
        self.echo(f"stage '{stage.name}' (step {stage.start}): fresh optimizer state")
        return state.replace(opt_state=init_opt_state(plan.tx, state.params, plan.trainable,
                                                      plan.shardings.opt_state))

    def save(self, mgr, state: TrainState, owner: int, data_iter: dict):
        step = int(state.step)
        checkpoint.save_train(
            mgr, step, params=state.params, opt_state=state.opt_state, data_iter=data_iter,
            meta=checkpoint.meta_dict(self.cfg),
            train_state={"step": step, "rng": np.asarray(state.rng).tolist(), "stage": owner,
                         "nonfinite_streak": int(state.nonfinite_streak),
                         "nonfinite_total": int(state.nonfinite_total)})

    def manager(self, async_save: bool):
        """The run's checkpoint manager, keeping what train.checkpoint says."""
        kept = self.cfg.train.checkpoint
        return checkpoint.train_manager(self.ckpt_dir, max_to_keep=kept.max_to_keep, keep_every=kept.keep_every,
                                        async_save=async_save)

    def commit_params(self, params, stage: Stage):
        """Ends `stage` (a sweep; this run stops at its start) with `params`: the newest checkpoint, at the stage's
        start, is saved again at its end with these parameters and a fresh optimizer state of the stage."""
        mgr = self.manager(async_save=False)
        try:
            restored = self.restore(mgr)
            found = int(restored[0].step) if restored else None
            if found != stage.start:
                raise checkpoint.CheckpointError(
                    f"stage '{stage.name}' sweeps from step {stage.start}, but the newest checkpoint in "
                    f"{self.ckpt_dir} is {'none' if found is None else f'step {found}'}; use the workdir the sweep "
                    "started in")
            state, _, data_iter = restored
            plan = self.plan(stage)
            params = jax.device_put(params, plan.shardings.params)
            state = state.replace(params=params, step=jax.device_put(np.int32(stage.end), state.step.sharding),
                                  opt_state=init_opt_state(plan.tx, params, plan.trainable, plan.shardings.opt_state))
            self.save(mgr, state, stage.index, data_iter)
            mgr.wait_until_finished()
        finally:
            mgr.close()

    def reference_dir(self, stage: Stage):
        return self.ckpt_dir.parent / "reference" / str(stage.index)

    def load_reference(self, state: TrainState, stage: Stage, plan: StagePlan):
        """The frozen reference of a DPO stage: the params it starts from, written once (atomically, as a
        params checkpoint of step `stage.start`) to <workdir>/reference/<stage index> when it starts, and read
        back from there, so a resumed stage scores against bitwise the same reference."""
        directory, step = self.reference_dir(stage), int(state.step)
        if not checkpoint.committed_steps(directory):  # none yet, or a save cut short (an uncommitted step)
            if step != stage.start:
                raise checkpoint.CheckpointError(
                    f"stage '{stage.name}' resumes at step {step} but its reference model {directory} (written when "
                    f"the stage started at step {stage.start}) is missing; restore that directory or use a new workdir")
            checkpoint.save_params(str(directory), state.params, self.cfg, step=stage.start)
            self.echo(f"stage '{stage.name}': reference model = the params at step {step}, saved to {directory}")
        saved_step = checkpoint.resolve(str(directory))[1]
        if saved_step != stage.start:
            raise checkpoint.CheckpointError(
                f"{directory} holds the reference of step {saved_step}, but stage '{stage.name}' starts at step "
                f"{stage.start} (train.stages changed); move it away to take the params of step {stage.start}")
        return checkpoint.restore_params(str(directory),
                                         abstract_with_shardings(self.abstract_params, plan.shardings.params))

    # ------------------------------------------------------------------------------- loop

    def describe(self, plan: StagePlan):
        """One line per stage; every parameter's sharding with train.log.sharding_table."""
        flat = opt.flatten(self.abstract_params)
        n_train = sum(v.size for k, v in flat.items() if k in plan.trainable)
        n_frozen = sum(v.size for k, v in flat.items() if k not in plan.trainable)
        opt_bytes = opt.tree_bytes(plan.abstract_opt_state(self.abstract_params))
        if self.cfg.train.log.sharding_table:
            self.echo(sharding.sharding_table(self.abstract_boxed, self.mesh, self.rules,
                                              {p: p in plan.trainable for p in flat}))
        self.echo(f"stage '{plan.stage.name}': {n_train:,} trainable / {n_frozen:,} frozen parameters; "
                  f"optimizer state {opt_bytes / 2**20:.2f} MiB (frozen parameters hold none); "
                  f"mesh {dict(self.mesh.shape)}")

    def open_source(self, stage: Stage, data_iter: dict):
        """The stage's training batches, continuing `data_iter` (the checkpoint item) where it applies."""
        return self.data.iterator(stage.index, data_iter)

    def place(self, batch: dict) -> dict:
        return self.data.place(batch, self.mesh, self.rules)

    def prepare(self, batch: dict) -> dict:
        """A placed batch, plus the reference's answer log-probs in a stage whose objective reads them (DPO)."""
        if self.reference_logps is None:
            return batch
        return {**batch, REFERENCE_LOGPS: self.reference_logps(self.reference, batch)}

    def iter_state(self, source) -> dict:
        return self.data.state(source)

    def run(self) -> RunResult:
        train = self.cfg.train
        init = self.init_source()  # a source that does not fit stops here, before the workdir is touched
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)  # creates nothing on an object store
        mgr = self.manager(train.checkpoint.async_save)
        try:
            with StopSignal() as stop:  # from here on a signal waits for a step boundary (and its save)
                restored = self.restore(mgr)
                if restored is None:
                    state, owner, data_iter = self.fresh_state(init), 0, {}
                else:
                    state, owner, data_iter = restored
                    self.echo(f"resumed from {self.ckpt_dir} step {int(state.step)}" + (
                        "; train.init_from is ignored (it only initialises a new run)" if train.init_from else ""))
                logger = MetricsLogger(self.cfg.workdir, int(state.step), train.log.tensorboard, self.echo,
                                       primary=jax.process_index() == 0, total_steps=self.end)
                try:
                    return self._loop(mgr, logger, state, owner, data_iter, stop)
                finally:
                    logger.close()
        finally:
            mgr.wait_until_finished()
            mgr.close()

    def _loop(self, mgr, logger, state, owner, data_iter, stop) -> RunResult:
        train, n_devices = self.cfg.train, self.mesh.devices.size
        peak = hardware.peak_flops_per_device(train.peak_flops_per_device)
        self.echo(f"MFU against {peak.source}" + (f": {peak.flops / 1e12:.3g} TFLOP/s per device" if peak.flops else ""))
        self.echo(host_memory.describe())
        result = RunResult(state)
        step = int(state.step)
        if step >= self.end:
            self.echo(f"nothing to train: the run is at step {step} and the config ends at step {self.end}; raise "
                      "train.steps (or add stages) to train further")
        while step < self.end:
            stage = stage_at(self.stages, step)
            plan = self.plan(stage)
            state, owner = self.enter_stage(state, owner, stage), stage.index
            self.describe(plan)
            source = self.open_source(stage, data_iter)
            try:
                state, step, data_iter = self._stage(mgr, logger, state, owner, stage, plan, source, stop, result,
                                                     peak, n_devices)
            finally:
                source.close()
            if result.stopped_by_signal:
                return result
        result.state = state
        return result

    def _stage(self, mgr, logger, state, owner, stage, plan, source, stop, result, peak, n_devices):
        """Runs `stage` up to its end (or a stop signal); returns (state, step, the last saved data_iter item).

        The host never waits for a step before dispatching the next one: step N's metrics are read after step N+1
        is queued (its NaN/Inf check and log line come one step late). Only a step that evaluates, saves or stops
        (and the stage's last) is waited for at once, since those read its state before the next step donates it.
        Step times are the intervals between consecutive metric arrivals."""
        train, step, data_iter = self.cfg.train, int(state.step), {}
        example, rows = self.data.example_batch(stage.index), self.data.global_batch(stage.index)
        batch_sh = batch_shardings(example, self.mesh, self.rules)
        step_fn = make_train_step(self.model, train, stage, plan.tx, plan.trainable, plan.shardings,
                                  batch_sh, self.mesh, self.rules)
        eval_fn = make_eval_step(self.model, train, stage, plan.shardings.params, batch_sh, self.mesh, self.rules)
        self.reference = self.reference_logps = None
        with_reference = needs_reference(get_objective(self.cfg.model, stage_train_config(train, stage)))
        if with_reference:
            self.reference = self.load_reference(state, stage, plan)
            self.reference_logps = make_reference_step(self.model, train, stage, plan.shardings.params, batch_sh,
                                                       self.mesh, self.rules)
        tokens = rows * self.data.sample_shape(stage.index)[0]
        stage_start, stage_end, pending, timing = step, min(stage.end, self.end), None, _Timing()
        profiler = StepProfiler(self.cfg.workdir, train.profile_steps, self.echo)
        try:
            while step < stage_end:
                host = next(source)
                step_flops = (flops.train_flops(self.cfg.model, host, plan.trainable, reference=with_reference)
                              * rows / len(host["input_ids"]))
                if step == stage_start:  # said once: the next step is dispatched before this one's metrics come
                    self.echo(f"compiling the train step of stage '{stage.name}' ...")
                profiler.before(step + 1)
                state, metrics = step_fn(state, self.prepare(self.place(host)))
                step += 1
                profiler.after(step, metrics)
                if pending is not None:  # the previous step's metrics, while this one runs
                    record = self._record(pending, timing, stage, stage_end, False, tokens, peak, n_devices, result)
                    if record is not None:
                        logger.write(record)
                pending = (step, metrics, step_flops)
                eval_due = bool(stage.eval_every and step % stage.eval_every == 0)
                stopping = stop.agreed()  # collective: every process stops after the same step, or none does
                save_due = step % train.checkpoint.every_steps == 0 or step == stage_end or stopping
                if not (eval_due or save_due):
                    continue
                record = self._record(pending, timing, stage, stage_end, stopping, tokens, peak, n_devices, result)
                pending = None
                if eval_due:
                    record.update(self.evaluate(eval_fn, state.params, stage))
                    record.update(self.task_metrics(state.params, stage))
                if record is not None:
                    logger.write(record)
                data_iter = {"stage": stage.index, "iter": self.iter_state(source)}
                self.save(mgr, state, owner, data_iter)
                timing.restart()  # evaluating and saving are not step time
                if stopping:
                    mgr.wait_until_finished()
                    self.echo(f"stopped by {stopping} at step {step}; checkpoint saved, run again to resume")
                    result.state, result.stopped_by_signal = state, True
                    return state, step, data_iter
        finally:
            profiler.stop()
        return state, step, data_iter

    def _log_due(self, step: int, stage: Stage, stage_end: int, stopping) -> bool:
        return bool(step % self.cfg.train.log.every_steps == 0 or step == stage_end or stopping
                    or (stage.eval_every and step % stage.eval_every == 0))

    def _record(self, pending, timing, stage, stage_end, stopping, tokens, peak, n_devices, result) -> dict | None:
        """Reads a dispatched step's metrics (waiting for it), stops on a NaN/Inf streak, and returns its log
        record when the step is logged (else None)."""
        step, metrics, step_flops = pending
        metrics = jax.device_get(metrics)
        if timing.arrived(step_flops):
            self.echo(f"compiled and ran the first step in {timing.first_s:.1f} s")
        result.losses[step] = float(metrics["loss"])
        if metrics["nonfinite_streak"] >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{int(metrics['nonfinite_streak'])} consecutive steps up to {step} had a non-finite loss "
                f"or gradient (updates skipped); lower the learning rate or check the data, then resume "
                f"from the last checkpoint")
        if not self._log_due(step, stage, stage_end, stopping):
            return None
        step_time, step_flops = timing.take()
        return dict(
            step=step, loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
            lr=float(metrics["lr"]), tokens_per_s=tokens / step_time, step_time_s=step_time,
            tflops_per_device=step_flops / step_time / n_devices / 1e12,
            **({"mfu": step_flops / step_time / (peak.flops * n_devices)} if peak.flops else {}),
            supervised_fraction=float(metrics["supervised_tokens"]) / tokens,
            z_loss=float(metrics["z_loss"]), nonfinite_total=int(metrics["nonfinite_total"]), stage=stage.name,
            **{k: float(v) for k, v in metrics["objective"].items()})

    def evaluate(self, eval_fn, params, stage: Stage) -> dict[str, float]:
        """{"eval_loss": loss per supervised unit (token; row or pair for other objectives), "eval_<metric>": the
        objective's metrics per unit} over the first `train.eval_batches` held-out batches (0 = all of them)."""
        totals, weight = {}, 0.0
        for batch in self.data.eval_batches(stage.index, self.cfg.train.eval_batches):
            out = jax.device_get(eval_fn(params, self.prepare(self.place(batch))))
            units = float(out["supervised_tokens"])
            for k, v in {"loss": out["loss"], **out["objective"]}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * units
            weight += units
        return {f"eval_{k}": v / max(weight, 1.0) for k, v in totals.items()}

    def task_metrics(self, params, stage: Stage) -> dict[str, float]:
        """Metrics logged beside eval_loss: the data's own (contrastive retrieval recall@k), and with
        `train.eval_examples` the exact-match accuracy of greedy answers to that many held-out records."""
        metrics = self.data.eval_metrics(self.model, params, stage.index, self.mesh, self.rules)
        # Answers are to SFT records; a stage of preference pairs logs its objective's held-out metrics instead.
        if self.cfg.train.eval_examples and not is_paired(get_objective(self.cfg.model,
                                                                         stage_train_config(self.cfg.train, stage))):
            evaluator = EVALUATORS.get(ANSWER_ACCURACY)
            metrics.update(evaluator(self.model, params, self.data, stage.index, self.cfg.train.eval_examples,
                                     self.mesh, self.rules))
        return metrics


class _Timing:
    """Step times from metric arrivals: the first step of a stage (compile included) is reported alone and left
    out of the means; `restart` drops the interval spent evaluating or saving."""

    def __init__(self):
        self.last, self.first, self.first_s = time.perf_counter(), True, 0.0
        self.times, self.flops = [], []

    def arrived(self, step_flops: float) -> bool:
        """Records one step's arrival; True for the stage's first."""
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        first, self.first = self.first, False
        if first:
            self.first_s, self.first_flops = elapsed, step_flops
        else:
            self.times.append(elapsed)
            self.flops.append(step_flops)
        return first

    def take(self) -> tuple[float, float]:
        """(mean step time, mean step FLOPs) since the last call; the first step's own when nothing else came."""
        if not self.times:
            return self.first_s, self.first_flops
        out = float(np.mean(self.times)), float(np.mean(self.flops))
        self.times, self.flops = [], []
        return out

    def restart(self):
        self.last = time.perf_counter()


def train(cfg: Config, devices=None, echo=print) -> RunResult:
    return Trainer(cfg, devices, echo).run()
