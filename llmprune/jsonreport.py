"""JSON reports the user asked for (``eval --json FILE``, ``sweep.json``): checked before any work,
always valid JSON, written atomically.

JSON has no NaN or infinity; ``json.dumps`` writes them as bare ``NaN``/``Infinity`` unless told
not to, which most readers refuse. So non-finite numbers are written as ``null`` (a perplexity that
overflowed, say) and the dump runs with ``allow_nan=False``, which turns anything missed into an
error here rather than an invalid file there.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import OutputError, UsageError


def check_report_path(path: str | os.PathLike, flag: str = "--json") -> Path:
    """Refuse, before any work, a report file that could not be written: its folder missing or
    not writable, or the path itself a folder (or anything but a regular file)."""
    if not os.fspath(path):
        raise UsageError(f"{flag} must name a file, got ''")
    target = Path(path).expanduser()
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)!r}: the folder {str(parent)!r} does not exist")
    if target.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)!r} is a folder, not a file")
    if target.exists() and not target.is_file():
        raise UsageError(f"{flag} {os.fspath(path)!r} exists and is not a regular file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {os.fspath(path)!r}: cannot write in {str(parent)!r}")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {os.fspath(path)!r} is not writable")
    return target


def finite_or_none(value):
    """A copy of value (dicts, lists, tuples of numbers and strings) with NaN and infinities as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def report_json(value, **options) -> str:
    """Valid JSON of value: non-finite numbers as null, and ``allow_nan=False`` for the rest."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


def write_json_report(path: str | os.PathLike, value) -> None:
    """Write report_json(value) to path through a temporary file beside it (no half-written file);
    a failure of the environment (disk full) is an OutputError and leaves nothing behind."""
    target = Path(path).expanduser()
    text = report_json(value, indent=2) + "\n"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
