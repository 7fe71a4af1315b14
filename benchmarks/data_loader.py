"""Input-pipeline throughput (examples/s) with reader threads only and with worker processes.

    python benchmarks/data_loader.py [--seconds 8] [--workers 0 2] [--train-steps 20]

Two configs: the CPU demo (embedded digits + shapes, 28 px tiles, packed) and Llama 3.2 Vision sized
examples (real photographs as JPEG files behind a JSONL, 560 px, up to 4 tiles, unpacked). For the demo
config it also runs the real train step of the tiny model on the same batches and prints how many examples
per second the step consumes, so the loader's headroom is a ratio measured in one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vlm_jax.data import (DataConfig, ImageConfig, InputSpec, PackingConfig, ShapeConfig, SourceConfig, WorkerConfig,
                          build_pipeline, task_texts, train_sentencepiece)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo_jsonl(folder: str) -> str:
    """The scikit-image photographs as JPEGs (as a crawled dataset would hold them) and a caption JSONL."""
    import skimage.data
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
    with open(os.path.join(folder, "photos.jsonl"), "w") as f:
        for name in names:
            Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(folder, f"{name}.jpg"), quality=90)
            f.write(json.dumps({"image": f"{name}.jpg", "text": f"a photograph: {name}"}) + "\n")
    return os.path.join(folder, "photos.jsonl")


def _configs(folder: str) -> dict[str, tuple[DataConfig, InputSpec]]:
    demo = DataConfig(sources=(SourceConfig("embedded", "digits_qa", weight=2), SourceConfig("embedded", "shapes_count")),
                      shapes=ShapeConfig(batch_size=32, seq_len=64, max_images=2), packing=PackingConfig(True))
    photos = DataConfig(sources=(SourceConfig("jsonl", "photos", path=_photo_jsonl(folder)),),
                        image=ImageConfig(max_tiles=4), shapes=ShapeConfig(batch_size=4, seq_len=128))
    return {"demo (28 px, packed)": (demo, InputSpec("cross_attention", 28, 4)),
            "mllama 560 px x4 tiles, photos": (photos, InputSpec("cross_attention", 560, 4))}


def measure(cfg: DataConfig, spec: InputSpec, tokenizer, seconds: float) -> float:
    it = build_pipeline(cfg, tokenizer, spec)
    try:
        next(it)  # start-up (worker processes, first reads) is not throughput
        start_examples, start = it.get_state()["records"]["good"], time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
        return (it.get_state()["records"]["good"] - start_examples) / (time.perf_counter() - start)
    finally:
        it.close()


def train_step_consumption(cfg: DataConfig, steps: int) -> float:
    """Examples/s the tiny model's real train step consumes on `cfg`'s batches (compilation excluded)."""
    from vlm_jax.config import load_config
    from vlm_jax.data import load_tokenizer
    from vlm_jax.families import input_spec
    from vlm_jax.train.loop import train
    with tempfile.TemporaryDirectory() as workdir:
        config = load_config(os.path.join(ROOT, "configs/examples/digits_mllama.yaml"), [
            f"workdir={workdir}", f"train.steps={steps}", "train.eval_every=0", "train.log.every_steps=1",
            "train.log.tensorboard=false", f"train.checkpoint.every_steps={steps}"])
        config = dataclasses.replace(config, data=dataclasses.replace(cfg, tokenizer=""))
        train(config, echo=lambda message: None)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            step_seconds = np.mean([json.loads(line)["step_time_s"] for line in f][1:])  # step 1 compiles
        it = build_pipeline(config.data, load_tokenizer(os.path.join(workdir, "tokenizer.model")),
                            input_spec(config.model))
        try:  # the same batches again, to count the packed examples each step consumed
            examples = np.mean([sum(len(set(row[row > 0])) for row in next(it)["segment_ids"]) for _ in range(steps)])
        finally:
            it.close()
    return float(examples / step_seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker process counts")
    parser.add_argument("--train-steps", type=int, default=20, help="train steps timed for the demo ratio (0: skip)")
    args = parser.parse_args()
    tokenizer = train_sentencepiece(task_texts() + ["a photograph: astronaut coffee chelsea rocket"] * 3, 256)
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        configs = _configs(folder)
        demo_cfg = next(iter(configs.values()))[0]
        for name, (cfg, spec) in configs.items():
            speeds = [measure(dataclasses.replace(cfg, workers=WorkerConfig(num_workers=w)), spec,
                              tokenizer, args.seconds) for w in args.workers]
            rows.append((name, speeds))
    print(f"| config | {' | '.join(f'{w} workers' for w in args.workers)} |  (examples/s, {os.cpu_count()} CPUs)")
    print("|---|" + "---|" * len(args.workers))
    for name, speeds in rows:
        print(f"| {name} | {' | '.join(f'{s:.1f}' for s in speeds)} |")
    if args.train_steps:
        consumed = train_step_consumption(demo_cfg, args.train_steps)
        print(f"tiny Mllama train step on the demo batches consumes {consumed:.1f} examples/s: the loader with "
              f"{args.workers[0]} workers runs {rows[0][1][0] / consumed:.1f}x faster than training needs")


if __name__ == "__main__":
    main()
