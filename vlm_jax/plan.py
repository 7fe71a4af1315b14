"""`vlm-jax plan`: compile the real train step for a Cloud TPU slice ahead of time, on this CPU machine, and
report per-device memory against HBM, FLOPs, and step time / tokens per second at peak and at an assumed MFU.

The step, shardings and batch shapes are exactly the trainer's; only the devices are libtpu's description of
the slice. Nothing runs: XLA's compiled memory and cost analyses are the figures.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import flax.linen as nn
import jax

from vlm_jax import sharding, topology
from vlm_jax.config import Config
from vlm_jax.config.model import vision_remat
from vlm_jax.errors import ConfigError
from vlm_jax.families import abstract_params, get_family
from vlm_jax.models.attention import resolved_model
from vlm_jax.objectives import REFERENCE_LOGPS
from vlm_jax.train import flops
from vlm_jax.train.data import TrainData, open_train_data
from vlm_jax.train.recipe import Stage, resolve_stages
from vlm_jax.train.state import StagePlan, TrainState, abstract_with_shardings
from vlm_jax.train.step import batch_shardings, make_reference_step, make_train_step

GiB = 1 << 30


@dataclass(frozen=True)
class StageReport:
    stage: str
    compile_s: float
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    hbm_bytes: int
    xla_flops: float  # per device, from the compiled module (loop bodies counted once, so below the model's)
    model_flops: float  # per device, from the config (what MFU counts)
    tokens: int  # global tokens per step
    peak_flops: float  # per device
    assumed_mfu: float
    compiler_oom: str = ""  # XLA's own verdict when the program cannot fit at all (it then stops compiling)
    # A DPO stage also keeps its frozen reference params on device, and runs a second program (the reference's
    # log-probs of each batch) while the train state stays there.
    reference_bytes: int = 0  # per device, held beside the train step's own buffers
    reference_step_bytes: int = 0  # per device: the reference pass's peak + the train state it runs beside

    @property
    def step_bytes(self) -> int:
        """The train step's peak live bytes."""
        return _live_bytes(**{field: getattr(self, field) for field in _MEMORY_FIELDS})

    @property
    def total_bytes(self) -> int:
        """The stage's peak on a device: the larger of its two programs with what stays resident beside each."""
        return max(self.step_bytes + self.reference_bytes, self.reference_step_bytes)

    @property
    def fits(self) -> bool:
        return not self.compiler_oom and self.total_bytes <= self.hbm_bytes

    def step_seconds(self, mfu: float) -> float:
        return self.model_flops / (self.peak_flops * mfu)

    def as_dict(self) -> dict:
        """Every field and derived figure, for `plan --json`."""
        return {**dataclasses.asdict(self), "step_bytes": self.step_bytes, "total_bytes": self.total_bytes,
                "fits": self.fits,
                "step_seconds_at_peak": self.step_seconds(1.0),
                "step_seconds_at_assumed_mfu": self.step_seconds(self.assumed_mfu)}


def _abstract_batch(data: TrainData, stage: Stage, mesh, rules) -> dict:
    """The global batch the trainer would place: every process's rows (the trainer's shapes x processes)."""
    example = data.example_batch(stage.index)
    rows = data.global_batch(stage.index)
    shapes = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in example.items()}
    return abstract_with_shardings(shapes, batch_shardings(shapes, mesh, rules))


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (the largest shard: uneven splits pad)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# StageReport's memory fields: XLA's compiled memory analysis, per device.
_MEMORY_FIELDS = dict(argument_bytes="argument_size_in_bytes", temp_bytes="temp_size_in_bytes",
                      output_bytes="output_size_in_bytes", alias_bytes="alias_size_in_bytes",
                      code_bytes="generated_code_size_in_bytes")


def _memory(compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    return {field: getattr(analysis, name) for field, name in _MEMORY_FIELDS.items()}


def _live_bytes(argument_bytes, temp_bytes, output_bytes, alias_bytes, code_bytes) -> int:
    """A program's peak live bytes: inputs + temporaries + outputs that do not reuse (donated) input buffers +
    code."""
    return argument_bytes + temp_bytes + output_bytes - alias_bytes + code_bytes


def _reference_bytes(model, cfg: Config, stage: Stage, state: TrainState, batch: dict, mesh, rules) -> dict:
    """A DPO stage's reference model on device (its batches carry the reference's column): its params beside the
    train step, and the peak of the pass that scores each batch under it, with the train state beside that pass."""
    if REFERENCE_LOGPS not in batch:
        return {}
    reference = state.params  # a copy of the stage's starting params, sharded like them
    batch_sh = {k: v.sharding for k, v in batch.items()}
    step = make_reference_step(model, cfg.train, stage, jax.tree.map(lambda x: x.sharding, reference), batch_sh,
                               mesh, rules)
    pass_bytes = _live_bytes(**_memory(step.lower(reference, {k: v for k, v in batch.items()
                                                               if k != REFERENCE_LOGPS}).compile()))
    return dict(reference_bytes=_device_bytes(reference), reference_step_bytes=pass_bytes + _device_bytes(state))


def plan_stage(cfg: Config, data: TrainData, stage: Stage, s: topology.Slice, devices,
               assumed_mfu: float) -> StageReport:
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.load_rules(cfg.mesh.rules)
    model = get_family(cfg.model).build(cfg.model)
    boxed = abstract_params(model)
    stage_plan = StagePlan(cfg, stage, boxed, mesh, rules)
    params = abstract_with_shardings(nn.meta.unbox(boxed), stage_plan.shardings.params)
    replicated = stage_plan.shardings.step

    def scalar(dtype, shape=()):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    state = TrainState(step=scalar("int32"), params=params, opt_state=stage_plan.abstract_opt_state(params),
                       rng=scalar("uint32", (2,)), nonfinite_streak=scalar("int32"), nonfinite_total=scalar("int32"))
    batch = _abstract_batch(data, stage, mesh, rules)
    step = make_train_step(model, cfg.train, stage, stage_plan.tx, stage_plan.trainable, stage_plan.shardings,
                           {k: v.sharding for k, v in batch.items()}, mesh, rules)
    seq_len = data.sample_shape(stage.index)[0]
    rows = data.global_batch(stage.index)
    example = data.example_batch(stage.index)
    per_sample = flops.train_flops(cfg.model, example, stage_plan.trainable, padded=True,
                                   reference=REFERENCE_LOGPS in example) / len(example["input_ids"])
    report = dict(stage=stage.name, hbm_bytes=s.chip.hbm_bytes // topology.devices_per_chip(s, devices),
                  model_flops=per_sample * rows / len(devices), tokens=rows * seq_len, assumed_mfu=assumed_mfu,
                  peak_flops=s.chip.peak_bf16_flops / topology.devices_per_chip(s, devices))
    start = time.perf_counter()
    try:
        compiled = step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return StageReport(compile_s=time.perf_counter() - start, **dict.fromkeys(_MEMORY_FIELDS, 0), xla_flops=0.0,
                           compiler_oom=str(e).split("RESOURCE_EXHAUSTED: ")[-1].splitlines()[0], **report)
    compile_s = time.perf_counter() - start
    report.update(_reference_bytes(model, cfg, stage, state, batch, mesh, rules))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return StageReport(compile_s=compile_s, **_memory(compiled), xla_flops=float(cost.get("flops", 0.0)), **report)


def advice(cfg: Config) -> str:
    """What to change when a stage does not fit, most effective first."""
    tips = []
    if cfg.model.remat_policy != "full":
        tips.append("model.remat_policy=full (recompute activations)")
    elif vision_remat(cfg.model) != "full":
        tips.append("model.vision_remat_policy=full (recompute the vision towers' activations too)")
    tips.append(f"train.microbatches={cfg.train.microbatches * 2} (halves activation memory per pass)")
    if cfg.mesh.rules == "fsdp_tp":
        tips.append("mesh.rules=fsdp_tp_vision_dp (splits the vision towers' images over `tensor` too)")
    elif cfg.mesh.rules != "fsdp_tp_vision_dp":
        tips.append("mesh.rules=fsdp_tp with mesh.tensor=4 (shards heads/MLP too)")
    tips.append("a larger slice or a smaller train.batch_size")
    return "; ".join(tips)


def format_report(r: StageReport) -> str:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    verdict = "fits" if r.fits else "DOES NOT FIT"
    peak_s, mfu_s = r.step_seconds(1.0), r.step_seconds(r.assumed_mfu)
    if r.compiler_oom:
        return f"stage '{r.stage}': DOES NOT FIT ({g(r.hbm_bytes)} HBM per device); XLA: {r.compiler_oom}"
    return "\n".join([
        f"stage '{r.stage}' (compiled in {r.compile_s:.1f} s)",
        f"  memory per device: arguments {g(r.argument_bytes)}, temporaries {g(r.temp_bytes)}, outputs "
        f"{g(r.output_bytes - r.alias_bytes)} (+{g(r.alias_bytes)} donated), code {g(r.code_bytes)}",
        *([f"  DPO reference model: its params {g(r.reference_bytes)} stay beside the train step ("
           f"{g(r.step_bytes + r.reference_bytes)}); its log-prob pass peaks at {g(r.reference_step_bytes)} "
           "with the train state beside it"] if r.reference_bytes else []),
        f"  total {g(r.total_bytes)} of {g(r.hbm_bytes)} HBM -> {verdict} ({100 * r.total_bytes / r.hbm_bytes:.0f}%)",
        f"  FLOPs per step per device: model {r.model_flops:.3e} (config, every image tile), XLA {r.xla_flops:.3e} (compiled; "
        "counts each scanned loop body once)",
        f"  step time: {peak_s:.3f} s at peak, {mfu_s:.3f} s at {100 * r.assumed_mfu:.0f}% MFU -> "
        f"{r.tokens / mfu_s:,.0f} tokens/s for the slice ({r.tokens:,} tokens per step)",
    ])


def plan(cfg: Config, slice_name: str, assumed_mfu: float = 0.4, stage_names: tuple[str, ...] = (),
         echo=print) -> list[StageReport]:
    s = topology.parse_slice(slice_name)
    devices = topology.topology_devices(s)
    if not 0 < assumed_mfu <= 1:
        raise ConfigError(f"--mfu {assumed_mfu}: the assumed MFU must be in (0, 1], e.g. --mfu 0.4")
    all_stages = resolve_stages(cfg.train)
    unknown = [name for name in stage_names if name not in {st.name for st in all_stages}]
    if unknown:
        raise ConfigError(f"--stage {unknown[0]}: no such stage; the config's stages are "
                          f"{', '.join(st.name for st in all_stages)}")
    # A reward_model or sample stage trains no step of the run's model (a reward model's step is the SFT
    # stage's plus a scalar head).
    side = [st for st in all_stages if st.kind != "train" and (not stage_names or st.name in stage_names)]
    if side:
        echo(f"not planned: {', '.join(f'{st.name} ({st.kind})' for st in side)}; plan covers the steps of the run's "
             "own model")
    all_stages = [st for st in all_stages if st.kind == "train"]
    # The shapes the slice's hosts would read; the data itself need not be on the planning machine.
    data = open_train_data(cfg, all_stages, get_family(cfg.model), echo, hosts=len({d.process_index for d in devices}))
    stages = [st for st in all_stages if not stage_names or st.name in stage_names]
    echo(f"plan for {s.name}: {s.topology}, {s.num_chips} chips, {len(devices)} devices, "
         f"{s.chip.hbm_bytes / GiB:.0f} GiB HBM and {s.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip")
    echo(f"mesh: {dict(sharding.make_mesh(cfg.mesh, devices).shape)} with rules '{cfg.mesh.rules}'; global batch "
         f"{data.global_batch(stages[0].index) if stages else 0}, microbatches {cfg.train.microbatches}, "
         f"remat {cfg.model.remat_policy} (vision towers {vision_remat(cfg.model)})")
    cfg = dataclasses.replace(cfg, model=resolved_model(cfg.model, "tpu", cfg.data.packing.enabled, echo))
    reports = []
    for stage in stages:
        reports.append(plan_stage(cfg, data, stage, s, devices, assumed_mfu))
        echo(format_report(reports[-1]))
    return reports
