"""The dense perplexity, reused when the same model, data and protocol were measured before: a
small JSON file per measurement under the llmprune cache folder, named by a hash of all three.

The model is identified by its folder's files (name, size, modification time) and the data by
its sources (for files: path, size, modification time); Hub ids and presets are not cached."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _source_identity(source: str) -> list | None:
    if source == "default":
        return ["default"]
    path = Path(source).expanduser()
    if path.is_file():
        return _file_identity(path)
    if path.is_dir():
        return [_file_identity(p) for p in sorted(path.rglob("*")) if p.is_file()]
    return None  # a preset: its content may change without us knowing


def dense_key(loaded) -> str | None:
    """The hash naming this dense measurement, or None when it cannot be identified."""
    from . import __version__
    from .models.loading import resolve_model

    spec = loaded.spec
    folder = Path(resolve_model(spec.model)).expanduser()
    if not folder.is_dir() or loaded.dispatched:
        return None
    sources = [_source_identity(s) for s in spec.eval_sources]
    if any(s is None for s in sources):
        return None
    identity = {"version": __version__, "model": [_file_identity(p) for p in sorted(folder.iterdir()) if p.is_file()],
                "data": sources, "eval_tokens": spec.eval_tokens, "eval_seqlen": spec.eval_seqlen,
                "dtype": loaded.dtype, "device": loaded.compute.type, "bos": loaded.bos,
                "tokens": int(loaded.evaluation.numel())}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    from .models.loading import cache_dir

    return cache_dir() / "perplexity" / f"{key}.json"


def read(key: str | None) -> dict | None:
    if key is None:
        return None
    try:
        value = json.loads(_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and "perplexity" in value else None


def write(key: str | None, value: dict) -> None:
    """Best effort: a cache that cannot be written is not an error."""
    if key is None:
        return
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
