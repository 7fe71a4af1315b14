"""TFDS datasets in ArrayRecord format: build one from JSONL + an image folder, read any with random access.

Works without TensorFlow: the builder is a plain GeneratorBasedBuilder writing ArrayRecord, and reading
goes through `tfds.data_source`. Images are stored as their original encoded bytes and decoded (robustly)
only when an example is prepared; turns are stored as parallel role/text sequences.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from vlm_jax.config import SourceConfig
from vlm_jax.data.bad_records import BadRecord
from vlm_jax.data.images import read_image_bytes
from vlm_jax.paths import user_path
from vlm_jax.registry import SOURCES
from vlm_jax.data.sources.jsonl import parse_record

log = logging.getLogger("vlm_jax.data")
VERSION = "1.0.0"


def _builder_class():
    # tensorflow_datasets takes ~0.5 s to import; only pay for it when a TFDS dataset is used.
    import tensorflow_datasets as tfds

    class ImageTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        # TFDS looks for a checksums file beside the builder's source via importlib.resources, which
        # fails for a class defined inside a function; this builder downloads nothing, so there is none.
        code_path = None

        def __init__(self, *, name: str, splits: dict[str, str], image_root: str, **kwargs):
            self.name = name  # per instance, so one class serves every dataset name
            self._splits, self._image_root = splits, image_root
            self.skipped: Counter = Counter()
            super().__init__(**kwargs)

        def _info(self):
            text_seq = tfds.features.Sequence(tfds.features.Text())
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
                "roles": text_seq,
                "texts": text_seq,
            }))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(path) for split, path in self._splits.items()}

        def _generate_examples(self, path):
            path = user_path(path, "split file")
            root = user_path(self._image_root, "image_root") if self._image_root else path.parent
            with path.open("rb") as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = parse_record(line, root)
                        images = [read_image_bytes(p) for p in record["images"]]
                    except BadRecord as e:
                        self.skipped[e.reason] += 1
                        log.warning("%s:%d skipped: %s", path, line_number, e)
                        continue
                    yield f"{path.name}:{line_number}", {
                        "images": images,
                        "roles": [role for role, _ in record["turns"]],
                        "texts": [text for _, text in record["turns"]],
                    }

    return ImageTextBuilder


def build_tfds_dataset(name: str, splits: dict[str, str], data_dir: str, image_root: str = "") -> dict[str, int]:
    """Writes `data_dir/name/1.0.0/` (ArrayRecord) from {split: jsonl_path}; returns skipped-line counts.

    Lines whose text is unusable or whose image file is missing are skipped (and logged); image bytes are
    stored as found, so corrupt images surface, counted, at training time.
    """
    builder = _builder_class()(name=name, splits=splits, image_root=image_root, data_dir=data_dir,
                               file_format="array_record")
    builder.download_and_prepare()
    return dict(builder.skipped)


_CAPTION_KEYS = ("caption", "text")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@SOURCES.register("tfds")
def tfds_source(cfg: SourceConfig) -> "TfdsSource":
    return TfdsSource(cfg.name, cfg.path, cfg.split)


class TfdsSource:
    """Random access to a TFDS ArrayRecord dataset, yielding {"images": [bytes], "turns": [(role, text)]}."""

    def __init__(self, name: str, data_dir: str, split: str):
        import tensorflow_datasets as tfds
        self.name = name
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"no TFDS dataset '{name}' in {data_dir}; write one with "
                             "vlm_jax.data.build_tfds_dataset or fix the source's name/path") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        if "roles" in example:  # written by build_tfds_dataset
            roles, texts, images = example["roles"], example["texts"], list(example["images"])
        else:  # a captioning dataset from elsewhere: one image (encoded or decoded) and one caption
            caption = next((example[k] for k in _CAPTION_KEYS if k in example), None)
            if caption is None or "image" not in example:
                raise BadRecord("bad_json", f"TFDS features {sorted(example)} lack 'image' and one of {_CAPTION_KEYS}")
            roles, texts, images = [b"user", b"assistant"], [b"", caption], [example["image"]]
        try:
            turns = [(_text(r), _text(t)) for r, t in zip(roles, texts)]
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"byte {e.start}") from None
        if not any(role == "assistant" and text.strip() for role, text in turns):
            raise BadRecord("empty_text", "no non-empty caption or answer")
        return {"images": [bytes(i) if isinstance(i, (bytes, np.bytes_)) else i for i in images], "turns": turns}

    def __repr__(self):
        return f"TfdsSource({self.name}, {len(self)} records)"
