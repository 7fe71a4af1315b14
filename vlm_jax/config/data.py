"""The `data:` section: what the trainer reads, and how the Grain pipeline reads, mixes, shapes and packs it.

Image geometry (tile side, mean/std, tiles per image for Mllama) belongs to the model and arrives in
`InputSpec`; this config only says how to read, mix, shape and pack the data.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_jax.config.loader import check
from vlm_jax.paths import user_path
from vlm_jax.registry import IMAGE_OPS, SOURCES, TEMPLATES

OVERFLOW = ("truncate", "drop")
# What a `kind: sample` stage (and `vlm-jax sample`) writes, by a stage source's `stage_output`.
STAGE_OUTPUTS = {"answers": "data.jsonl", "pairs": "pairs.jsonl"}
SAMPLED_DATA_FILE, SAMPLED_PAIRS_FILE = STAGE_OUTPUTS["answers"], STAGE_OUTPUTS["pairs"]


@dataclass(frozen=True)
class SourceConfig:
    kind: str = "embedded"  # "embedded" | "jsonl" | "tfds" | any kind added with register_source
    # embedded: a task name (see `list_tasks`); tfds: the dataset name ("name" or "name:1.0.0");
    # jsonl: a label used in logs.
    name: str = "digits_qa"
    path: str = ""  # jsonl: the .jsonl file; tfds: the TFDS data_dir
    image_root: str = ""  # jsonl: folder that relative image paths resolve against ("" = the file's folder)
    split: str = "train"  # embedded/tfds split ("train", "test", tfds slicing like "train[:90%]")
    weight: float = 1.0  # relative share in the training mixture
    size: int = 0  # embedded procedural tasks: examples in the split (0 = the task default)
    # jsonl, in a recipe stage's data: the dataset an earlier `kind: sample` stage of the same run wrote under
    # <workdir>/stages/<stage>/, instead of `path`: `stage_output` "answers" (data.jsonl: the kept answers, SFT
    # records) or "pairs" (pairs.jsonl: on-policy preference pairs, the kept answer against the prompt's worst).
    stage: str = ""
    stage_output: str = "answers"


@dataclass(frozen=True)
class ImageConfig:
    op: str = "mllama_tile"  # "mllama_tile" | "catty_tile" | "resize"
    max_tiles: int = 4  # mllama_tile: must equal the model's max_num_tiles; catty_tile: grid budget
    thumbnail: bool = True  # catty_tile: append a whole-image thumbnail when there is more than one tile


@dataclass(frozen=True)
class ShapeConfig:
    """One fixed batch shape, so the train step compiles once."""
    batch_size: int = 8  # rows per process
    seq_len: int = 512
    max_images: int = 1  # image slots per row (unified models: one slot per tile or thumbnail)
    overflow: str = "truncate"  # samples longer than seq_len: "truncate" or "drop" (both counted)


@dataclass(frozen=True)
class PackingConfig:
    enabled: bool = False  # several samples per row, separated by segment ids (training only)


@dataclass(frozen=True)
class WorkerConfig:
    num_workers: int = 0  # worker processes for decode/tile/tokenize; 0 = threads in this process
    read_threads: int = 2  # threads per process (or worker) reading and preprocessing records
    buffer_size: int = 8  # preprocessed examples buffered per worker
    prefetch_batches: int = 2  # batches assembled ahead in a background thread (0 = none)


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    eval_sources: tuple[SourceConfig, ...] = ()
    tokenizer: str = ""  # a sentencepiece .model, an HF tokenizer.json, or a folder holding one
    template: str = "simple"  # "simple" (own tokenizers) | "llama3_vision" (imported Llama 3.2 checkpoints)
    image: ImageConfig = ImageConfig()
    shapes: ShapeConfig = ShapeConfig()
    packing: PackingConfig = PackingConfig()
    workers: WorkerConfig = WorkerConfig()
    seed: int = 0
    max_bad_fraction: float = 0.01  # stop when more than this share of records is unusable
    bad_fraction_min_records: int = 200  # ... judged only after this many records


def _validate_source(s: SourceConfig, where: str):
    SOURCES.get(s.kind, f"{where}.kind")
    check(bool(s.name), f"{where}.name must be set (an embedded task, a TFDS dataset name or a label)")
    check(s.kind not in ("jsonl", "tfds") or bool(s.path) or (s.kind == "jsonl" and bool(s.stage)),
           f"{where}.path must be set for a {s.kind} source ({'the .jsonl file, or `stage:` the recipe stage that writes it' if s.kind == 'jsonl' else 'the TFDS data_dir'})")
    check(s.stage_output in STAGE_OUTPUTS, f"{where}.stage_output '{s.stage_output}' is none of "
          f"{', '.join(STAGE_OUTPUTS)}")
    check(not s.stage or s.kind == "jsonl", f"{where}.stage names a recipe stage's output, which only a jsonl source reads; "
          f"set kind: jsonl or remove stage")
    for key in ("path", "image_root"):
        if getattr(s, key):
            user_path(getattr(s, key), f"{where}.{key}")  # an unknown scheme stops here, named
    check(s.weight > 0, f"{where}.weight must be positive, got {s.weight}")
    check(s.size >= 0, f"{where}.size must be >= 0 (0 = task default), got {s.size}")


def validate_data(cfg: DataConfig, where: str = "data"):
    """Raises ConfigError (one line naming the key) for the first problem found."""
    check(len(cfg.sources) > 0, f"{where}.sources is empty; list at least one source")
    for i, s in enumerate(cfg.sources):
        _validate_source(s, f"{where}.sources[{i}]")
    for i, s in enumerate(cfg.eval_sources):
        _validate_source(s, f"{where}.eval_sources[{i}]")
    if cfg.tokenizer:
        user_path(cfg.tokenizer, f"{where}.tokenizer")
    TEMPLATES.get(cfg.template, f"{where}.template")
    IMAGE_OPS.get(cfg.image.op, f"{where}.image.op")
    check(cfg.image.max_tiles > 0, f"{where}.image.max_tiles must be positive, got {cfg.image.max_tiles}")
    for name in ("batch_size", "seq_len", "max_images"):
        value = getattr(cfg.shapes, name)
        check(value > 0, f"{where}.shapes.{name} must be positive, got {value}")
    check(cfg.shapes.overflow in OVERFLOW, f"{where}.shapes.overflow: '{cfg.shapes.overflow}' is not one of {OVERFLOW}")
    w = cfg.workers
    check(w.num_workers >= 0, f"{where}.workers.num_workers must be >= 0, got {w.num_workers}")
    check(w.read_threads > 0, f"{where}.workers.read_threads must be positive, got {w.read_threads}")
    check(w.buffer_size > 0, f"{where}.workers.buffer_size must be positive, got {w.buffer_size}")
    check(w.prefetch_batches >= 0, f"{where}.workers.prefetch_batches must be >= 0, got {w.prefetch_batches}")
    check(0 <= cfg.seed < 2**31, f"{where}.seed must be in [0, 2^31), got {cfg.seed}")
    check(0.0 <= cfg.max_bad_fraction <= 1.0,
           f"{where}.max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    check(cfg.bad_fraction_min_records >= 1,
           f"{where}.bad_fraction_min_records must be >= 1, got {cfg.bad_fraction_min_records}")
