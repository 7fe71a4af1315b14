"""Read and write safetensors (single file or sharded with an index) as numpy, bf16 included.

Written here rather than through `safetensors.numpy` because that cannot represent bfloat16, and so that
truncated or corrupt files are reported as one clear line instead of a deep traceback. No pickle anywhere.
Directories may be local (files are memory-mapped) or on an object store (gs://: each file is read whole).
"""
from __future__ import annotations

import json
import math
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from vlm_jax.errors import ConversionError
from vlm_jax.paths import atomic_open, is_remote, user_path

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_header(path, data: np.ndarray) -> tuple[dict, int]:
    size = len(data)
    if size < 8:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download it")
    (n,) = struct.unpack("<Q", data[:8].tobytes())
    if 8 + n > size:
        raise ConversionError(f"{path}: truncated safetensors file (header needs {8 + n} bytes, file has "
                              f"{size}); re-download it")
    try:
        header = json.loads(data[8:8 + n].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{path}: corrupt safetensors header; re-download it") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated safetensors file (tensors need {8 + n + end} bytes, file has "
                              f"{size}); re-download it")
    return header, 8 + n


def read_file(path) -> dict[str, np.ndarray]:
    """One file's tensors, read-only: views of a memory map (local) or of the whole object's bytes (gs://)."""
    path = user_path(path, "safetensors file")
    if is_remote(path):
        data = np.frombuffer(path.read_bytes(), np.uint8)
    elif path.stat().length == 0:  # np.memmap refuses an empty file
        data = np.zeros(0, np.uint8)
    else:
        data = np.memmap(str(path), dtype=np.uint8, mode="r")
    header, base = _read_header(path, data)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = (base + int(o) for o in info["data_offsets"])
        dtype = np.dtype(DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise ConversionError(f"{path}: tensor '{name}' byte range does not match its shape; file is corrupt")
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def read_dir(hf_dir) -> dict[str, np.ndarray]:
    """All weights of a Hugging Face directory: sharded (index.json) or a single model.safetensors."""
    hf_dir = user_path(hf_dir, "--hf")
    index_path = hf_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConversionError(f"{index_path}: malformed index (needs a 'weight_map' object)") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = hf_dir / shard
            if not shard_path.is_file():
                raise ConversionError(f"{shard_path}: shard named in {INDEX_NAME} is missing; re-download it")
            tensors.update(read_file(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(f"{index_path}: {len(missing)} indexed tensors are absent from their shards, "
                                  f"e.g. '{missing[0]}'")
        return tensors
    single = hf_dir / SINGLE_NAME
    if single.is_file():
        return read_file(single)
    names = sorted(p.name for p in hf_dir.iterdir())
    files = [f for f in names if f.endswith(".safetensors")]
    if files:
        tensors = {}
        for f in files:
            tensors.update(read_file(hf_dir / f))
        return tensors
    pickled = [f for f in names if f.endswith((".bin", ".pt", ".pth"))]
    hint = (" (found pickled PyTorch weights, which are not loaded for safety; re-save them with "
            "save_pretrained(..., safe_serialization=True))") if pickled else ""
    raise ConversionError(f"{hf_dir}: no *.safetensors weights{hint}")


Layout = list[tuple[str, tuple, np.dtype]]  # (name, shape, dtype) of each tensor, in the order they are written


def _nbytes(shape: tuple, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _write_file(path, layout: Layout, tensors: Iterator[tuple[str, np.ndarray]]):
    """Writes the tensors of `layout`, taking each from `tensors` as it is due (the header comes first)."""
    header, offset = {}, 0
    for name, shape, dtype in layout:
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # 8-byte aligned tensor data
    with atomic_open(path, "wb") as f:  # never a half-written file under the final name
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in layout:
            got, arr = next(tensors)
            if (got, tuple(arr.shape), arr.dtype) != (name, tuple(shape), np.dtype(dtype)):
                raise ConversionError(f"{path}: tensor '{got}' {arr.dtype}{list(arr.shape)} arrived where the layout "
                                      f"has '{name}' {np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def write_stream(out_dir, layout: Layout, tensors: Iterable[tuple[str, np.ndarray]],
                 max_shard_bytes: int = 5 << 30):
    """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index when over `max_shard_bytes`, from
    `tensors` ((name, array) in `layout`'s order) as they come: the layout fixes every shard's header before any
    data, so host memory holds one tensor at a time (an object-store upload holds its shard, see atomic_open)."""
    out_dir = user_path(out_dir, "--out")
    shards: list[Layout] = [[]]
    size = 0
    for entry in layout:
        nbytes = _nbytes(*entry[1:])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tensors = iter(tensors)
    for name, shard in zip(names, shards):
        _write_file(out_dir / name, shard, tensors)
    if len(shards) == 1:
        return
    weight_map = dict(sorted((entry[0], name) for name, shard in zip(names, shards) for entry in shard))
    total = sum(_nbytes(*entry[1:]) for entry in layout)
    with atomic_open(out_dir / INDEX_NAME) as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_dir(out_dir, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 << 30):
    """`write_stream` of in-memory tensors, in name order."""
    items = sorted(tensors.items())
    write_stream(out_dir, [(k, v.shape, v.dtype) for k, v in items], items, max_shard_bytes)
