"""Input-pipeline throughput (examples/s) with reader threads only and with worker processes.

    python benchmarks/data_loader.py [--seconds 8] [--workers 0 2]

Two configs: the CPU demo (embedded digits + shapes, 28 px tiles, packed) and Llama 3.2 Vision sized
examples (real photographs as JPEG files behind a JSONL, 560 px, up to 4 tiles, unpacked).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from PIL import Image

from vlm_jax.data import (DataConfig, ImageConfig, InputSpec, PackingConfig, ShapeConfig, SourceConfig, WorkerConfig,
                          build_pipeline, task_texts, train_sentencepiece)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker process counts")
    args = parser.parse_args()
    tokenizer = train_sentencepiece(task_texts() + ["a photograph: astronaut coffee chelsea rocket"] * 3, 256)
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for name, (cfg, spec) in _configs(folder).items():
            speeds = [measure(cfg.__class__(**{**cfg.__dict__, "workers": WorkerConfig(num_workers=w)}), spec,
                              tokenizer, args.seconds) for w in args.workers]
            rows.append((name, speeds))
    print(f"| config | {' | '.join(f'{w} workers' for w in args.workers)} |  (examples/s, {os.cpu_count()} CPUs)")
    print("|---|" + "---|" * len(args.workers))
    for name, speeds in rows:
        print(f"| {name} | {' | '.join(f'{s:.1f}' for s in speeds)} |")


if __name__ == "__main__":
    main()
