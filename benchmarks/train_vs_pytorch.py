"""Train step side by side: vlm_jax's Trainer vs transformers (PyTorch) on the same weights and batches, fp32.

  JAX_PLATFORMS=cpu python benchmarks/train_vs_pytorch.py --config configs/models/mllama_100m.yaml \
      train.batch_size=2 train.synthetic.seq_len=128 train.synthetic.num_tiles=4
  JAX_PLATFORMS=cpu python benchmarks/train_vs_pytorch.py --config configs/models/llava_100m.yaml \
      train.batch_size=2 train.synthetic.seq_len=256

Our side is the real Trainer: its fresh state, its stage plan and `make_train_step`, fed its training batches
(train.synthetic). That state is exported with `to_hf` and loaded by the class its config.json names, and
transformers' model trains on the same batches: forward + backward + global-norm clipping + AdamW with our
hyper-parameters and our weight-decay mask (carried over by exporting the mask itself). Both sides first
train the same two batches and print their losses: the first must agree to ~1e-4 (same weights), the second
too (same update). Then `--rounds` interleaved rounds of `--steps` steps each (ours, then PyTorch: the machine
is shared, so a slow spell hits both) and the median step time per side over every step but the first of each
round. That first step is each side's switch-over: the other side has just freed gigabytes in its own pattern,
and the kernel spends seconds handing our next step its pages (at 4 x 256 on huge pages, 2.6-3.4 s of system
time in the step after transformers', 0.3-0.6 s in the next), which a process running one framework never
pays; its median is printed too, and so is the range of each round's own ratio (its two sides ran back to
back, so the range is the machine's noise on the ratio). MFU of both sides uses our FLOPs model
(vlm_jax/train/flops.py) against the peak the Trainer uses; on CPU that is a measured fp32 matmul peak, which
moves with the shared machine's load, so it is measured again at the start of each round and the median of
those is the denominator. The optimizer update alone is timed the same way on each side (optax's update
jitted with the state donated, over the real parameter tree; torch's clipping + AdamW.step() with gradients in
place) and given as a share of the step. Both sides share this process, which
starts over with huge pages for host memory as `vlm-jax` does (vlm_jax/host_memory.py;
GLIBC_TUNABLES=glibc.malloc.hugetlb=0 measures both without); with --hold-freed-memory glibc also keeps what
either side frees for its next step, so no step page-faults and no first step of a round pays the switch: what
is left is each side's compute. Prints one JSON line, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm_jax import hardware, host_memory  # noqa: E402
from vlm_jax.config import load_config  # noqa: E402
from vlm_jax.convert import to_hf  # noqa: E402
from vlm_jax.train import flops  # noqa: E402
from vlm_jax.train import optimizer as opt  # noqa: E402
from vlm_jax.train.loop import Trainer  # noqa: E402
from vlm_jax.train.step import batch_shardings, make_train_step  # noqa: E402

# transformers models that take the batch's real images as one flat (images, C, H, W) list, in row order,
# where our batch holds (B, slots, C, H, W) plus an image_mask.
FLAT_IMAGE_LIST = ("llava",)
DISTINCT_BATCHES = 4  # cycled through by the timed steps


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Ours:
    """The Trainer's jitted step on its own state (donated each step), and its optimizer update alone."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.stage = trainer, trainer.stages[0]
        self.plan = trainer.plan(self.stage)
        self.state = trainer.fresh_state()
        batch_sh = batch_shardings(trainer.data.example_batch(self.stage.index), trainer.mesh, trainer.rules)
        self.step_fn = make_train_step(trainer.model, trainer.cfg.train, self.stage, self.plan.tx,
                                       self.plan.trainable, self.plan.shardings, batch_sh, trainer.mesh, trainer.rules)

    def step(self, batch) -> float:
        self.state, metrics = self.step_fn(self.state, batch)
        return float(metrics["loss"])

    def optimizer_seconds(self, repeats: int) -> float:
        """The step's update alone over the trainable tree, state donated, gradients fixed: clipping, Adam
        moments, masked decay, learning rates and the non-finite guard (not the gradient norm it reads)."""
        params, _ = opt.split(self.state.params, self.plan.trainable)
        peaks = opt.peak_learning_rates(sorted(params), self.stage.schedule.learning_rate, self.stage.lr_groups)
        tx = self.plan.tx

        def update(params, opt_state, grads, finite):
            return opt.apply_update(tx, grads, opt_state, params, finite, 1.0, peaks)

        update = jax.jit(update, donate_argnums=(0, 1))
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
        carry = [params, self.state.opt_state]
        self.state = None  # its buffers are donated below

        def once():
            carry[0], carry[1] = update(carry[0], carry[1], grads, jnp.bool_(True))
            jax.block_until_ready(carry)
        once()  # compile
        return median_time(once, repeats)


class Torch:
    """transformers' model from the export, trained by torch's AdamW with the same hyper-parameters."""

    def __init__(self, hf_dir: str, decay_dir: str, cfg, fused: bool):
        import torch
        import transformers
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_config = json.load(f)
        self.torch, self.model_type = torch, hf_config["model_type"]
        model_cls = getattr(transformers, hf_config["architectures"][0])
        self.model = model_cls.from_pretrained(hf_dir, dtype=torch.float32).train()
        # The export of our decay mask (1 = decayed) loads into the same parameter order.
        decayed = [bool((p == 1).all()) for p in model_cls.from_pretrained(decay_dir, dtype=torch.float32).parameters()]
        params = list(self.model.parameters())
        o, s = cfg.train.optimizer, cfg.train.schedule
        groups = [{"params": [p for p, d in zip(params, decayed) if d], "weight_decay": o.weight_decay},
                  {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}]
        self.params, self.clip_norm = params, o.clip_norm
        self.decayed_fraction = sum(p.numel() for p, d in zip(params, decayed) if d) / sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(groups, lr=s.learning_rate, betas=(o.b1, o.b2), eps=o.eps, fused=fused)

    def inputs(self, batch: dict) -> dict:
        """Our batch as the HF model's keyword arguments; labels = input_ids where supervised, else -100 (HF
        shifts them as our objective does)."""
        batch = {k: np.asarray(v) for k, v in batch.items()}
        loss_mask = batch.pop("loss_mask")
        image_mask = batch.pop("image_mask", None)
        if image_mask is not None:
            if self.model_type not in FLAT_IMAGE_LIST:
                sys.exit(f"no input mapping for HF model_type '{self.model_type}' with an image_mask; add it here")
            batch["pixel_values"] = batch["pixel_values"][image_mask.astype(bool)]
        batch["labels"] = np.where(loss_mask > 0, batch["input_ids"], -100)
        to = lambda v: self.torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v)  # noqa: E731
        return {k: to(np.ascontiguousarray(v)) for k, v in batch.items()}

    def clip_and_update(self):
        if self.clip_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()

    def step(self, inputs: dict) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**inputs).loss
        loss.backward()
        self.clip_and_update()
        return float(loss.detach())

    def optimizer_seconds(self, repeats: int) -> float:
        """Clipping + AdamW.step() with the last step's gradients in place."""
        self.clip_and_update()
        return median_time(self.clip_and_update, repeats)


def export_decay_mask(trainer: Trainer, params, out_dir: str):
    """Our AdamW decay mask as a checkpoint of ones (decayed) and zeros, so transformers loads it into its own
    parameter layout."""
    no_decay = trainer.cfg.train.optimizer.no_decay
    flat = opt.flatten(nn.meta.unbox(params))
    mask = {k: np.full(v.shape, 0.0 if opt.full_match(k, no_decay) else 1.0, np.float32) for k, v in flat.items()}
    to_hf(trainer.model, opt.unflatten(mask), out_dir)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per side per round (>= 2: the first is not timed)")
    p.add_argument("--optimizer-repeats", type=int, default=5)
    p.add_argument("--torch-fused", action="store_true", help="torch's fused AdamW (default: its default)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (shapes: train.batch_size=, "
                                                "train.synthetic.seq_len=, train.synthetic.num_tiles=)")
    p.add_argument("--hold-freed-memory", action="store_true",
                   help="glibc keeps freed memory for reuse (vlm_jax.host_memory.HOLD_FREED), so neither side's "
                        "steps page-fault: the comparison of compute alone")
    return p.parse_args()


def main(args: argparse.Namespace) -> int:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.hold_freed_memory and not host_memory.holds_freed(tunables):  # not glibc, or the user's own values
        sys.exit(f"--hold-freed-memory: glibc with GLIBC_TUNABLES {':'.join(host_memory.HOLD_FREED)} is needed; "
                 f"this process has {tunables!r}")
    import torch
    torch.set_num_threads(os.cpu_count() or 1)  # XLA's CPU client uses every core too

    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(args.config, [f"workdir={workdir}", "train.synthetic.enabled=true", "train.steps=1000000",
                                        "train.schedule.kind=constant", "train.schedule.warmup_steps=0",
                                        *args.overrides])
        if not cfg.model.dtype == cfg.model.param_dtype == "float32":
            sys.exit("the comparison is fp32 on both sides: set model.dtype=float32 model.param_dtype=float32")
        if args.steps < 2:
            sys.exit("--steps must be at least 2: the first step of each round is not timed")
        if cfg.train.microbatches != 1:
            sys.exit("train.microbatches must be 1 (transformers' side takes the whole batch)")
        trainer = Trainer(cfg, echo=lambda _: None)
        ours = Ours(trainer)
        hf_dir, decay_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "decay")
        to_hf(trainer.model, ours.state.params, hf_dir)
        export_decay_mask(trainer, ours.state.params, decay_dir)
        theirs = Torch(hf_dir, decay_dir, cfg, args.torch_fused)

        source = trainer.open_source(ours.stage, {})
        host = [next(source) for _ in range(DISTINCT_BATCHES)]
        source.close()
        placed, torch_inputs = [trainer.place(b) for b in host], [theirs.inputs(b) for b in host]

        start = time.perf_counter()
        losses = [(ours.step(placed[0]), theirs.step(torch_inputs[0]))]  # ours compiles here
        first_s = time.perf_counter() - start
        losses.append((ours.step(placed[1]), theirs.step(torch_inputs[1])))
        for i, (a, b) in enumerate(losses):
            print(f"step {i + 1} loss: vlm_jax {a:.8f}  transformers {b:.8f}  |diff| {abs(a - b):.2e}", flush=True)

        peak = hardware.peak_flops_per_device(cfg.train.peak_flops_per_device)
        # A measured peak moves with the machine's load: measure it again in each round, beside the steps it
        # bills (a configured or vendor peak stays as it is).
        times = {"ours": [], "torch": []}  # per round, its steps' seconds
        round_peaks = []
        for r in range(args.rounds):
            if peak.measured:
                round_peaks.append(hardware.matmul_peak_now())
            for name, run, batches in (("ours", ours.step, placed), ("torch", theirs.step, torch_inputs)):
                times[name].append([])
                for k in range(args.steps):
                    start = time.perf_counter()
                    run(batches[(r * args.steps + k) % DISTINCT_BATCHES])
                    times[name][-1].append(time.perf_counter() - start)
        step_s = {k: statistics.median(t for steps in v for t in steps[1:]) for k, v in times.items()}
        switch_s = {k: statistics.median(steps[0] for steps in v) for k, v in times.items()}
        # Each round's two sides ran minutes apart at most: their ratio shows how far the machine's noise moves it.
        round_ratios = [statistics.median(t[1:]) / statistics.median(o[1:])
                        for o, t in zip(times["ours"], times["torch"])]
        opt_s = {"torch": theirs.optimizer_seconds(args.optimizer_repeats),
                 "ours": ours.optimizer_seconds(args.optimizer_repeats)}

        rows = trainer.data.global_batch(ours.stage.index)
        seq_len, num_images = trainer.data.sample_shape(ours.stage.index)
        # The timed steps cycle through the host batches; padded image slots are not billed (see flops.py).
        step_flops = statistics.mean(flops.train_flops(cfg.model, h, ours.plan.trainable) * rows / len(h["input_ids"])
                                     for h in host)
        if peak.measured:
            peak = peak._replace(flops=statistics.median(round_peaks), source=f"{peak.source}, median of one per round")
        n_devices = trainer.mesh.devices.size
        mfu = {k: step_flops / v / (peak.flops * n_devices) if peak.flops else None for k, v in step_s.items()}
        n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_params))
        record = dict(
            config=args.config, overrides=args.overrides, host_memory=host_memory.describe(),
            family=cfg.model.family, hf_class=type(theirs.model).__name__,
            parameters=n_params, batch=rows, seq_len=seq_len, num_images=num_images,
            num_tiles=cfg.train.synthetic.num_tiles, devices=n_devices, device_kind=jax.devices()[0].device_kind,
            torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_fused_adamw=args.torch_fused,
            rounds=args.rounds, steps_per_round=args.steps,
            loss_first=list(losses[0]), loss_second=list(losses[1]), first_step_s=round(first_s, 2),
            step_flops=step_flops, peak_flops=peak.flops, peak_source=peak.source, round_peak_flops=round_peaks,
            ours_step_s=step_s["ours"], torch_step_s=step_s["torch"], speed_ratio=step_s["torch"] / step_s["ours"],
            round_speed_ratios=round_ratios,
            ours_mfu=mfu["ours"], torch_mfu=mfu["torch"],
            ours_optimizer_s=opt_s["ours"], torch_optimizer_s=opt_s["torch"],
            ours_optimizer_share=opt_s["ours"] / step_s["ours"], torch_optimizer_share=opt_s["torch"] / step_s["torch"],
            ours_switch_step_s=switch_s["ours"], torch_switch_step_s=switch_s["torch"],
            decayed_fraction=theirs.decayed_fraction, ours_step_times=times["ours"], torch_step_times=times["torch"])
        print(json.dumps(record))
        pct = lambda x: f"{100 * x:.0f}%" if x is not None else "n/a"  # noqa: E731
        spread = f": {min(round_peaks) / 1e9:.0f}-{max(round_peaks) / 1e9:.0f}" if round_peaks else ""
        print(f"{args.config} {' '.join(args.overrides)}: {n_params:,} parameters, batch {rows} x {seq_len}, "
              f"{step_flops / 1e9:.1f} GFLOP/step; peak {peak.flops / 1e9 if peak.flops else 0:.0f} GFLOP/s "
              f"({peak.source}{spread}); median of {args.rounds} x {args.steps - 1} interleaved steps")
        print(record["host_memory"])
        print(f"{'':<24}{'s/step':>9}{'MFU':>7}{'optimizer s':>13}{'share':>7}")
        for label, k in (("JAX (vlm_jax)", "ours"), ("PyTorch (transformers)", "torch")):
            print(f"{label:<24}{step_s[k]:>9.3f}{pct(mfu[k]):>7}{opt_s[k]:>13.3f}{pct(opt_s[k] / step_s[k]):>7}")
        print(f"{'speed (torch / ours)':<24}{step_s['torch'] / step_s['ours']:>8.2f}x   (each round's: "
              f"{min(round_ratios):.2f}-{max(round_ratios):.2f}x, median {statistics.median(round_ratios):.2f}x)")
        print(f"first step of each round, after the other side's (not in the medians above): vlm_jax "
              f"{switch_s['ours']:.3f} s, transformers {switch_s['torch']:.3f} s")
    return 0


if __name__ == "__main__":
    args = parse_args()
    # As `vlm-jax` runs, or holding freed memory; both sides share this process's allocator.
    host_memory.exec_with_huge_pages(hold_freed=args.hold_freed_memory)
    sys.exit(main(args))
