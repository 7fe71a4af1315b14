"""User paths: local, or an object store that etils.epath handles (gs://, s3://, az://), treated alike.

Every path a user gives (workdir, checkpoints, --out, --hf, config files, data sources, tokenizers) goes
through `user_path`; nothing reads or writes one with os.path, open(), os.makedirs or os.replace. Object
stores have no appends and no empty directories, and a rename is copy + delete. `atomic_open` never shows a
half-written file under its final name: a local file is written to a temporary name and renamed; an object is
uploaded in one request once the writer closes without error (a store publishes an object only when its
upload completes, so a killed writer leaves nothing), which costs the object's size in memory.
"""
from __future__ import annotations

import contextlib
import io
import os

from etils import epath

from vlm_jax.errors import ConfigError

SCHEMES = ("gs", "s3", "az")  # the object stores epath reaches through fsspec (gcsfs, s3fs, adlfs)


def scheme(path) -> str:
    """'gs' for gs://bucket/x, '' for a local path."""
    head, sep, _ = str(path).partition("://")
    return head if sep else ""


def is_remote(path) -> bool:
    return bool(scheme(path))


def user_path(path, key: str) -> epath.Path:
    """`path` as an epath.Path: an absolute local path, or an object-store URI. An unknown scheme stops with
    one line naming `key` (never guessed as a local folder)."""
    if isinstance(path, epath.Path):
        return path
    text = str(path)
    if not text:
        raise ConfigError(f"{key} is empty; give a local path or a {'://, '.join(SCHEMES)}:// URI")
    found = scheme(text)
    if found and found not in SCHEMES:
        raise ConfigError(f"{key}: '{text}' uses the scheme {found}://, which vlm-jax cannot read or write; "
                          f"use a local path or one of {', '.join(s + '://' for s in SCHEMES)}")
    return epath.Path(text) if found else epath.Path(os.path.abspath(os.path.expanduser(text)))


def resolve_from(folder: epath.Path, ref: str, key: str) -> epath.Path:
    """`ref` as written inside a file in `folder`: absolute and URI references stand alone, others are relative."""
    if is_remote(ref) or ref.startswith(("/", "~")):
        return user_path(ref, key)
    return folder / ref if is_remote(folder) else user_path(str(folder / ref), key)  # local: '..' normalised


def check_writable(path: epath.Path, key: str, folder: bool = False):
    """Stops with one line naming `key` when the local `path` (a file, or a `folder`) cannot be created or written:
    it sits under a file, is the wrong kind, or its nearest existing folder is not writable. Object stores are
    judged by the write itself."""
    if is_remote(path):
        return
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{key}: {path} is a {'file' if folder else 'directory'}; give a "
                          f"{'directory' if folder else 'file'} path")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created because {existing} is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable; choose another path or fix its permissions")


def is_nonempty(path: epath.Path) -> bool:
    """True when `path` is a file, or a folder holding anything (an object-store prefix with objects under it)."""
    return path.exists() and (not path.is_dir() or any(True for _ in path.iterdir()))


@contextlib.contextmanager
def atomic_open(path: epath.Path, mode: str = "w"):
    """Writes `path` through a temporary sibling renamed into place once the writer closes without error."""
    if is_remote(path):
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        (path.write_bytes if "b" in mode else path.write_text)(buffer.getvalue())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    try:
        with tmp.open(mode) as f:
            yield f
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write (e.g. a full disk) names no file
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    tmp.replace(path)


def write_atomic(path: epath.Path, data: str | bytes):
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


# Sits in an output folder while a command writes it (`writing_folder`); found there later, it means the writer
# was killed (SIGKILL, a lost machine) and what is beside it is a partial output of ours.
WRITING_MARKER = ".vlm_jax_writing"


def _empty(folder: epath.Path):
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_dir():
            path.rmtree()
        else:
            path.unlink()


@contextlib.contextmanager
def writing_folder(folder: epath.Path):
    """For writing into `folder` while it holds nothing else. On an error or an interrupt what was written there is
    removed; a killed process leaves its files and the marker, which `clear_killed_write` recognises."""
    try:
        write_atomic(folder / WRITING_MARKER, "an output being written; if no command is writing it, the writer "
                                              "was killed and the next command that writes here replaces it\n")
        yield folder
    except BaseException:
        _empty(folder)
        raise
    (folder / WRITING_MARKER).unlink()


def clear_killed_write(folder: epath.Path) -> bool:
    """Removes what a killed `writing_folder` left in `folder` (it holds the marker); False when it is not that."""
    if not (folder / WRITING_MARKER).exists():
        return False
    _empty(folder)
    return True
