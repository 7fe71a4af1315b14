"""A whole recipe under `vlm-jax train`: the run's training stages and, between them, the post-training stages
that are not one training run of its model (Llama 3-V): an SFT sweep souped into one model, a reward model,
rejection sampling.

The run's model lives in <workdir>/checkpoints, its global steps contiguous over its stages; the Trainer trains
it one stage at a time. The other stages keep what they make in <workdir>/stages/<name>/:
- a sweep trains each variant as a run of its own (<name>/<i>, from the run's checkpoint at the stage's start),
  then writes the soup of them as the run's checkpoint at the stage's end (the ranking in <name>/soup.json);
- a reward_model stage trains one run (<name>/checkpoints) from the run's current parameters plus a zero head;
- a sample stage writes <name>/data.jsonl (+ images), which later stages read as `{kind: jsonl, stage: <name>}`.
Each is done once its output is committed, so running the config again resumes where it stopped: an interrupted
run resumes its own checkpoint (the Trainer's resume); an interrupted sampling or soup runs again from its start
and comes out the same (sampling keys come from the seed, the soup from its ingredients).

With train.eval_examples > 0 the run's model is evaluated after every stage (greedy exact-match accuracy on that
many records of each data.eval_sources entry), side by side in <workdir>/stages/accuracy.json and a table.
"""
from __future__ import annotations

import json
from dataclasses import replace

import jax
import numpy as np

from vlm_jax.config import (STAGES_DIR, Config, StageConfig, apply_overrides, from_dict, stage_data_config, stage_output_dir,
                            to_dict, validate)
from vlm_jax.data.tokenizer import TOKENIZER_FILE
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.infer.answer import load_answerer
from vlm_jax.infer.evaluate import evaluate_sources, text_table
from vlm_jax.infer.generate import Sampling
from vlm_jax.infer.sample import DATA_FILE, PAIRS_FILE, judge, results_table, sample_sources, write_dataset
from vlm_jax.infer.soup import soup_checkpoints, soup_row, soup_table
from vlm_jax.paths import check_writable, user_path, write_atomic
from vlm_jax.train import checkpoint
from vlm_jax.train.loop import RunResult, Trainer
from vlm_jax.train.recipe import Stage, resolve_stages, total_steps

ACCURACY_FILE = "accuracy.json"
SOUP_FILE = "soup.json"


def _as_files(sources):
    return tuple(replace(s, stage="") if s.path else s for s in sources)


def stage_run_config(cfg: Config, stage: Stage, name: str, workdir: str, init_from: str, tokenizer: str,
                     variant: dict | None = None) -> Config:
    """The config of a stage trained as a run of its own (a sweep variant, a reward model): one stage `name` with
    the stage's settings, starting from `init_from`, reading the run's `tokenizer`, with `variant`'s keys set."""
    reward_model = stage.kind == "reward_model"
    train = replace(cfg.train, steps=0, stages=(StageConfig(name=name, steps=stage.own_steps,
                                                            eval_every=stage.eval_every),),
                    trainable=stage.trainable, frozen=stage.frozen,
                    schedule=stage.schedule, optimizer=replace(cfg.train.optimizer, lr_groups=stage.lr_groups),
                    synthetic=stage.synthetic, objective="reward" if reward_model else stage.objective,
                    dpo=stage.dpo, reward=stage.reward, init_from=init_from)
    data = stage_data_config(cfg.data, stage.data, f"train.stages[{stage.index}].data")
    # Its own run has no sample stages: what they wrote is read as the plain files their paths resolved to.
    data = replace(data, sources=_as_files(data.sources), eval_sources=_as_files(data.eval_sources))
    run = replace(cfg, model=replace(cfg.model, reward_head=True) if reward_model else cfg.model, train=train,
                  data=replace(data, tokenizer=tokenizer) if data.sources else data, workdir=workdir)
    if variant:
        where = f"train.stages[{stage.index}].sweep.variants"
        run = from_dict(Config, apply_overrides(to_dict(run), [f"{k}={json.dumps(v)}" for k, v in variant.items()]),
                        where)
    validate(run)
    return run


def variant_label(variant: dict) -> str:
    """A sweep variant's keys for a table: `learning_rate=0.0003`; a list by its length (`sources=[6]`)."""
    return " ".join(f"{k.split('.')[-1]}=" + (f"[{len(v)}]" if isinstance(v, (list, tuple)) else str(v))
                    for k, v in variant.items())


def check_sampled(stage: Stage, results: list, pair_readers: list[str]):
    """One line when a sample stage's `results` leave a later stage nothing to train on: no kept answer, or no
    preference pair for the stages in `pair_readers` (those reading its `stage_output: pairs`)."""
    prompts = sum(r.prompts for r in results)
    if not any(r.kept for r in results):
        lower = f"lower train.stages[{stage.index}].sample.threshold or " if stage.sample.reward_model else ""
        raise UserError(f"stage '{stage.name}' kept none of {prompts} prompts' answers, so the stages after it "
                        f"would have no data; {lower}train the stages before it longer")
    if pair_readers and not any(r.pairs for r in results):
        raise UserError(f"stage '{stage.name}' made no preference pairs (no prompt's samples scored unequally), "
                        f"which stage '{pair_readers[0]}' trains on; raise train.stages[{stage.index}].sample."
                        "num_samples or temperature")


class Recipe:
    def __init__(self, cfg: Config, devices=None, echo=print):
        if not cfg.workdir:
            raise ConfigError("workdir is not set; pass workdir=DIR (checkpoints and metrics go there)")
        check_writable(user_path(cfg.workdir, "workdir"), "workdir", folder=True)
        self.cfg, self.devices, self.echo = cfg, devices, echo
        self.stages = resolve_stages(cfg.train)
        self.end = total_steps(cfg.train, self.stages)
        self.ckpt_dir = user_path(cfg.workdir, "workdir") / "checkpoints"
        self.result = RunResult(state=None)
        for stage in self.stages:
            if stage.sweep and stage.sweep.soup != "average" and not self.stage_data(stage).eval_sources:
                raise ConfigError(f"train.stages[{stage.index}].sweep.soup '{stage.sweep.soup}' ranks the variants "
                                  "by held-out accuracy, but the stage's data has no eval_sources; list some")
        if jax.process_count() > 1:
            self.check_one_process_stages_done()

    def check_one_process_stages_done(self):
        """A run of several processes trains the stages that train in place; the sweeps, reward models and
        samplings it reaches must already be done in the workdir (by a run on one host)."""
        pending = [s for s in self.stages if not s.trains_in_place and self.reaches(s) and not self.done(s)]
        if not pending:
            return
        first, last = pending[0], pending[-1]
        here = f"set train.steps={first.start} to train the stages before it here, then " if first.start else ""
        rest = (f"up to step {last.end} on one host (train.steps={last.end}); the stages after it train here again"
                if last.end < self.end else "the rest on one host")
        raise ConfigError(f"stage '{first.name}' ({'a sweep' if first.sweep else first.kind}) runs in one process, "
                          f"and this run has {jax.process_count()}: {here}run {rest}")

    def done(self, stage: Stage) -> bool:
        """Whether a sweep, reward model or sampling stage has its output committed in the workdir (a rerun, on
        any number of processes, skips it)."""
        if stage.sweep:
            return self.committed(self.ckpt_dir) >= stage.end
        if stage.kind == "reward_model":
            return self.committed(stage_output_dir(self.cfg.workdir, stage.name) / "checkpoints") >= stage.own_steps
        return (stage_output_dir(self.cfg.workdir, stage.name) / DATA_FILE).exists()

    def reaches(self, stage: Stage) -> bool:
        """Whether the run gets to `stage`: train.steps may cut the recipe short, and a stage that would start at
        the cut does not run."""
        return stage.start < self.end or (stage.start == self.end and not stage.steps
                                          and self.end >= self.stages[-1].end)

    def stage_data(self, stage: Stage):
        return stage_data_config(self.cfg.data, stage.data, f"train.stages[{stage.index}].data")

    def tokenizer(self) -> str:
        """The run's tokenizer: data.tokenizer, or the one its first stage trained into the workdir."""
        return self.cfg.data.tokenizer or str(user_path(self.cfg.workdir, "workdir") / TOKENIZER_FILE)

    def committed(self, directory) -> int:
        return max(checkpoint.committed_steps(directory), default=-1)

    def run(self) -> RunResult:
        """Every stage up to train.steps (all of them when it is 0); stops early, like the Trainer, on a signal."""
        for i, stage in enumerate(self.stages):
            if not self.reaches(stage):
                break
            following = self.stages[i + 1] if i + 1 < len(self.stages) else None
            if stage.trains_in_place and following and following.trains_in_place and not self.cfg.train.eval_examples:
                continue  # one Trainer goes on into the next stage
            done = self.run_stage(stage)
            if self.result.stopped_by_signal:
                return self.result
            if done and self.cfg.train.eval_examples:
                self.record_accuracy(stage)
        # The rest of a cut recipe; with every stage done before, the Trainer says so and hands back the state.
        self.train_to(self.end, force=self.result.state is None)
        self.print_accuracy()
        return self.result

    def run_stage(self, stage: Stage) -> bool:
        """Runs (or finishes) `stage`; True once the run's model is through it."""
        if stage.trains_in_place:
            return self.train_to(min(stage.end, self.end))
        if stage.sweep:
            return self.sweep(stage)
        if stage.kind == "reward_model":
            self.train_side(stage, stage.name)
        else:
            self.sample(stage)
        return False

    def train_to(self, step: int, force: bool = False) -> bool:
        """The run's model trained up to global `step` (its stages from the newest checkpoint)."""
        if self.committed(self.ckpt_dir) >= step and not force:
            return True
        cut = replace(self.cfg, train=replace(self.cfg.train, steps=step))
        result = Trainer(cut, self.devices, self.echo).run()
        self.result.losses.update(result.losses)
        self.result.state, self.result.stopped_by_signal = result.state, result.stopped_by_signal
        return not result.stopped_by_signal

    def train_side(self, stage: Stage, name: str, variant: dict | None = None) -> str:
        """A stage's own run in <workdir>/stages/<name>, from the run's checkpoint at the stage's start; its
        checkpoints."""
        directory = stage_output_dir(self.cfg.workdir, name)
        ckpt = directory / "checkpoints"
        if self.committed(ckpt) < stage.own_steps:
            start = self.ckpt_dir / str(stage.start)
            self.echo(f"stage '{stage.name}': training {directory} from {start}")
            run = stage_run_config(self.cfg, stage, name, str(directory), str(start), self.tokenizer(), variant)
            result = Trainer(run, self.devices, self.echo).run()
            self.result.stopped_by_signal = result.stopped_by_signal
        return str(ckpt)

    def sweep(self, stage: Stage) -> bool:
        """Each variant trained, then the soup of them committed as the run's checkpoint at the stage's end."""
        if self.done(stage):
            return True
        directory = stage_output_dir(self.cfg.workdir, stage.name)
        paths = []
        for i, variant in enumerate(stage.sweep.variants):
            paths.append(self.train_side(stage, f"{stage.name}/{i}", variant))
            if self.result.stopped_by_signal:
                return False
        data = self.stage_data(stage)
        soup = soup_checkpoints(paths, stage.sweep.soup, replace(data, tokenizer=self.tokenizer()),
                                stage.sweep.eval_examples, batch_size=data.shapes.batch_size)
        names = [f"{stage.name}/{i} {variant_label(variant)}".rstrip() for i, variant in enumerate(stage.sweep.variants)]
        self.echo(soup_table(names, stage.sweep.soup, soup))
        write_atomic(directory / SOUP_FILE, json.dumps(soup_row(paths, stage.sweep.soup, soup), indent=2))
        Trainer(replace(self.cfg, train=replace(self.cfg.train, steps=stage.start)), self.devices,
                self.echo).commit_params(soup.params, stage)
        self.echo(f"stage '{stage.name}': {stage.sweep.soup} soup of {sum(soup.kept)} of {len(paths)} variants is "
                  f"the run's step {stage.end}")
        return True

    def sample(self, stage: Stage):
        """The stage's rejection-sampled dataset from the run's model at the stage's step."""
        out = stage_output_dir(self.cfg.workdir, stage.name)
        if self.done(stage):
            return
        s, data = stage.sample, replace(self.stage_data(stage), tokenizer=self.tokenizer())
        if not data.sources:
            raise ConfigError(f"train.stages[{stage.index}] samples answers to its data.sources, which are empty; "
                              "list the prompts (SFT records with reference answers)")
        policy = self.ckpt_dir / str(stage.start)
        answerer = load_answerer(str(policy), data.tokenizer, data, batch_size=s.batch_size,
                                 max_new_tokens=s.max_new_tokens,
                                 sampling=Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p))
        reward = str(stage_output_dir(self.cfg.workdir, s.reward_model) / "checkpoints") if s.reward_model else ""
        score, threshold = judge(s.verifier, reward, s.threshold, data.tokenizer, data, s.batch_size)
        results = sample_sources(answerer, data.sources, s.limit, score, threshold, s.num_samples, s.seed,
                                 f"train.stages[{stage.index}].data.sources")
        self.echo(results_table(results))
        readers = [st.name for st in self.stages if any(
            src.stage == stage.name and src.stage_output == "pairs" for src in self.stage_data(st).sources)]
        check_sampled(stage, results, readers)
        written = write_dataset(out, results)  # data.jsonl last: it marks the stage done
        self.echo(f"stage '{stage.name}': kept {written} of {sum(r.prompts for r in results)} prompts -> "
                  f"{out / DATA_FILE}; {sum(r.pairs for r in results)} preference pairs -> {out / PAIRS_FILE}")

    # ------------------------------------------------------------------ accuracy after every stage

    def accuracy_path(self):
        return user_path(self.cfg.workdir, "workdir") / STAGES_DIR / ACCURACY_FILE

    def accuracies(self) -> dict:
        path = self.accuracy_path()
        return json.loads(path.read_text()) if path.exists() else {}

    def record_accuracy(self, stage: Stage):
        """Held-out accuracy of the run's model at the end of `stage`, once."""
        table, step = self.accuracies(), min(stage.end, self.end)
        if stage.name in table or not self.cfg.data.eval_sources:
            return
        if step not in checkpoint.committed_steps(self.ckpt_dir):
            self.echo(f"stage '{stage.name}': its checkpoint (step {step}) is no longer kept; not evaluated")
            return
        answerer = load_answerer(str(self.ckpt_dir / str(step)), self.tokenizer(), self.cfg.data,
                                 batch_size=self.cfg.data.shapes.batch_size)
        results = evaluate_sources(answerer, self.cfg.data.eval_sources, self.cfg.train.eval_examples,
                                   perplexity=False)
        table[stage.name] = {"step": step, "accuracy": float(np.mean([r.accuracy for r in results])),
                             "sources": {r.label: r.accuracy for r in results}}
        if jax.process_index() == 0:  # every process evaluated (a collective); one writes, as with metrics.jsonl
            write_atomic(self.accuracy_path(), json.dumps(table, indent=2))

    def print_accuracy(self):
        table = self.accuracies()
        if not table:
            return
        labels = list(next(iter(table.values()))["sources"])
        self.echo(f"held-out accuracy after each stage ({self.cfg.train.eval_examples} records per source):\n" +
                  text_table(["stage", "step", "mean", *labels],
                             [[name, str(row["step"]), f"{row['accuracy']:.1%}",
                               *(f"{row['sources'][label]:.1%}" for label in labels)] for name, row in table.items()]))


def run_recipe(cfg: Config, devices=None, echo=print) -> RunResult:
    return Recipe(cfg, devices, echo).run()
