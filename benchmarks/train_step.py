"""Train-step time, tokens/s and MFU, plus checkpoint save/restore times, for one config on this machine.

  python benchmarks/train_step.py --config configs/models/tiny_mllama.yaml
  python benchmarks/train_step.py --config configs/models/mllama_100m.yaml --steps 5 train.batch_size=4

Runs `vlm_jax.train.loop` for a few steps on generated batches (train.synthetic) in a temporary workdir (the
first step, which compiles, is not timed), then times a synchronous save and a restore of the full train
state. On CPU the MFU is against this CPU's fp32 matmul peak, measured at start-up (vlm_jax/hardware.py).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax

from vlm_jax import host_memory
from vlm_jax.config import load_config
from vlm_jax.train import checkpoint
from vlm_jax.train.loop import Trainer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(args.config, [f"workdir={workdir}", "train.synthetic.enabled=true",
                                        f"train.steps={args.steps}", "train.log.tensorboard=false",
                                        f"train.log.every_steps={args.steps}", "train.checkpoint.async_save=false",
                                        f"train.checkpoint.every_steps={args.steps}", *args.overrides])
        trainer = Trainer(cfg, echo=lambda _: None)
        result = trainer.run()
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            record = json.loads(f.readlines()[-1])
        plan = trainer.plan(trainer.stages[0])
        mgr = checkpoint.train_manager(os.path.join(workdir, "bench"), max_to_keep=2, keep_every=0, async_save=False)
        start = time.perf_counter()
        trainer.save(mgr, result.state, 0, {})
        mgr.wait_until_finished()
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                trainer.abstract_params, plan.shardings.params)
        restored = checkpoint.restore_train(mgr, int(result.state.step), abstract,
                                            plan.abstract_opt_state(trainer.abstract_params))
        jax.block_until_ready(restored[checkpoint.PARAMS])
        restore_s = time.perf_counter() - start
        mgr.close()
        n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_params))
        print(json.dumps({"config": args.config, "parameters": n_params, "devices": jax.device_count(),
                          "device_kind": jax.devices()[0].device_kind, "host_memory": host_memory.describe(),
                          "batch": cfg.train.batch_size,
                          "seq_len": cfg.train.synthetic.seq_len,
                          **{k: record[k] for k in ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu")},
                          "checkpoint_save_s": round(save_s, 3), "checkpoint_restore_s": round(restore_s, 3)}))


if __name__ == "__main__":
    host_memory.exec_with_huge_pages()  # as `vlm-jax` runs
    main()
