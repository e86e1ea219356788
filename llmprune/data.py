"""Calibration and evaluation text sources -> token tensors, seeded.

A *source* is one of:

- a local file: ``.txt`` / ``.txt.gz`` (UTF-8, one document per file), ``.jsonl`` /
  ``.jsonl.gz`` (one JSON object per line, field ``text``), ``.parquet`` (column ``text``);
- a local folder: every such file inside it, recursively, in sorted path order (names starting
  with ``.`` are skipped);
- a Hub preset (``wikitext2``, ``c4``, ``ptb``; see ``PRESETS``), loaded with
  ``datasets.load_dataset`` exactly as the SparseGPT / Wanda reference code does;
- ``default`` (also what ``None`` or an empty list means): the docstrings of the running
  interpreter's standard library, an offline corpus present wherever Python is.

Preset names win over a file or folder of the same name; write ``./c4`` for the folder.
Local files serve both parts (the user chooses what to pass); presets and ``default`` have
separate calibration and evaluation parts that share no document.

Calibration: the documents are joined (``"\\n\\n"``, or the paper's joiner for a preset),
tokenised once without special tokens, and ``nsamples`` windows of ``seqlen`` tokens start at
offsets drawn uniformly with ``torch.Generator().manual_seed(seed)``; windows may overlap, as in
the papers. ``c4`` instead follows the papers' document sampling: a random document with at least
``seqlen`` tokens, then a random window inside it (tokenising a whole C4 shard takes minutes).

Evaluation: the documents joined with ``"\\n\\n"`` (for every source: our declared protocol),
tokenised once without special tokens, truncated to ``max_tokens``.

Bounds on local files: only regular files are read (a FIFO, a device, a socket, or a symbolic
link to one is refused before it is opened in a way that could block); all local files of one
part together may hold at most ``max_bytes`` bytes of text after decompression (default
``DEFAULT_MAX_DATA_BYTES``, 2 GiB: far above any calibration corpus; the CLI's
``--max-data-bytes``); a ``.gz`` file is first decompressed without keeping anything, to count,
so a small file that expands to gigabytes is refused in seconds with constant memory; and text
with a stretch of more than ``MAX_UNCUT_CHARS`` characters that offers no place to cut it into
tokenizer-sized pieces is refused instead of being handed to the tokenizer whole.

Offline behaviour of presets: huggingface_hub retries an unreachable Hub five times with
backoff (about 23 s measured here, with no setting to shorten it). So unless the user already
set ``HF_HUB_OFFLINE``, we first try a TCP connection to the Hub endpoint (3 s timeout; skipped
when an HTTPS proxy is configured) and, if that fails, call ``load_dataset`` in offline mode, which
uses the local datasets cache or fails in milliseconds. Either failure is one ``UsageError``.
"""

from __future__ import annotations

import ast
import contextvars
import functools
import gc
import gzip
import hashlib
import itertools
import json
import os
import re
import stat
import sysconfig
import warnings
import zlib
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from llmprune.errors import UsageError
from llmprune.hub import hub_reachable as _hub_reachable
from llmprune.limits import MAX_DATA_BYTES

DEFAULT_SOURCE = "default"
PARTS = ("calibration", "evaluation")

# name -> how the preset is loaded. ``load_dataset(path, name, data_files=..., split=...)`` with
# the values of the part; ``field`` is the text column; ``joiner`` joins the documents for
# calibration (evaluation always uses "\n\n"). Sources read: IST-DASLab/sparsegpt datautils.py
# (get_wikitext2, get_ptb, get_c4) and locuslab/wanda lib/data.py (get_wikitext2, get_c4).
PRESETS: dict[str, dict] = {
    "wikitext2": {
        "path": "wikitext",
        "name": "wikitext-2-raw-v1",
        "data_files": {"calibration": None, "evaluation": None},
        "split": {"calibration": "train", "evaluation": "test"},
        "field": "text",
        "joiner": " ",
        "sampling": "stream",
        "max_documents": {"calibration": None, "evaluation": None},
        "description": (
            "WikiText-2 raw (dataset 'wikitext', config 'wikitext-2-raw-v1'), field 'text'. "
            "Calibration: split 'train', rows joined with ' ' as in SparseGPT/Wanda. "
            "Evaluation: split 'test', rows joined with '\\n\\n' (same as the papers)."
        ),
    },
    "c4": {
        "path": "allenai/c4",
        # The papers also pass the config name 'allenai--c4', which current `datasets`
        # rejects; the data_files alone select the same shard.
        "name": None,
        "data_files": {
            "calibration": {"train": "en/c4-train.00000-of-01024.json.gz"},
            "evaluation": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        },
        "split": {"calibration": "train", "evaluation": "validation"},
        "field": "text",
        "joiner": "\n\n",  # unused: c4 calibration samples documents, it never joins them
        "sampling": "documents",
        "max_documents": {"calibration": None, "evaluation": 1100},
        "description": (
            "C4 English (dataset 'allenai/c4', no config), field 'text'. Calibration: split "
            "'train' of data_files en/c4-train.00000-of-01024.json.gz; each sample is a random "
            "document with at least seqlen tokens and a random window inside it, as in "
            "SparseGPT/Wanda. Evaluation: split 'validation' of data_files "
            "en/c4-validation.00000-of-00008.json.gz, its first 1100 documents as in the papers, "
            "joined with '\\n\\n' (the papers join with ' ' and keep 256 x seqlen tokens: "
            "pass max_tokens for that)."
        ),
    },
    "ptb": {
        "path": "ptb_text_only",
        "name": "penn_treebank",
        "data_files": {"calibration": None, "evaluation": None},
        "split": {"calibration": "train", "evaluation": "test"},
        "field": "sentence",
        "joiner": " ",
        "sampling": "stream",
        "max_documents": {"calibration": None, "evaluation": None},
        "description": (
            "Penn Treebank (dataset 'ptb_text_only', config 'penn_treebank'), field "
            "'sentence'. Calibration: split 'train', sentences joined with ' ' as in SparseGPT. "
            "Evaluation: split 'test' as in SparseGPT, joined with '\\n\\n' (SparseGPT joins "
            "with ' ')."
        ),
    },
}

# Local file suffixes, longest first so ".txt.gz" is not taken for ".gz".
_SUFFIXES = (".txt.gz", ".jsonl.gz", ".parquet", ".jsonl", ".txt")

# Default corpus: stdlib folders that are not library code, and the split and size caps.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_EVAL_BUCKETS = 5  # 1 file in 5 (by sha256 of its relative path) goes to evaluation
# Caps in characters, measured on CPython 3.11: calibration holds ~1.5 MB of docstrings
# (~390k SmolLM2 tokens, ~1.5 s to tokenise), evaluation ~0.3 MB (~79k tokens). The caps only
# bite on interpreters with more docstrings and keep tokenising under ~2 s.
_DEFAULT_MAX_CHARS = {"calibration": 1_800_000, "evaluation": 600_000}

# Local text read for one part (calibration or evaluation), in bytes after decompression.
DEFAULT_MAX_DATA_BYTES = MAX_DATA_BYTES.default
_MAX_DATA_BYTES = contextvars.ContextVar("llmprune_max_data_bytes", default=DEFAULT_MAX_DATA_BYTES)
_READ_CHUNK = 1 << 20
# Characters with no place to cut (see _encode) before the text is refused: a stretch this long
# costs the tokenizer ~1 s; 200 MB of one "word" makes the Rust tokenizer abort the process.
MAX_UNCUT_CHARS = 1 << 20

# A document must yield seqlen tokens within this many random draws (c4 document sampling).
_MIN_DRAWS = 10_000
_DRAWS_PER_SAMPLE = 200


# ----------------------------------------------------------------------------- public API


def load_texts(sources: Sequence[str] | None, part: str, max_bytes: int | None = None) -> list[str]:
    """Documents of ``part`` ("calibration" or "evaluation") from every source, in order."""
    return [doc for _, docs, _ in _segments(sources, part, max_bytes) for doc in docs]


def check_max_bytes(max_bytes) -> int:
    """The cap on local data (bytes of text after decompression), or a one-line UsageError."""
    if not _is_int(max_bytes) or max_bytes < 1:
        raise UsageError(f"--max-data-bytes must be a positive number of bytes, got {max_bytes!r}")
    return max_bytes


@contextmanager
def max_data_bytes(max_bytes: int | None):
    """Within the block, local data is read up to ``max_bytes`` bytes per part (None: unchanged).

    The command line sets the cap once around a whole run, so that no function between the
    flag and the file reader needs a parameter for it; an explicit ``max_bytes`` argument of
    ``load_texts``, ``calibration_ids`` or ``evaluation_ids`` wins over it.
    """
    if max_bytes is None:
        yield
        return
    token = _MAX_DATA_BYTES.set(check_max_bytes(max_bytes))
    try:
        yield
    finally:
        _MAX_DATA_BYTES.reset(token)


def calibration_ids(
    tokenizer, sources: Sequence[str] | None, nsamples: int, seqlen: int, seed: int, max_bytes: int | None = None
) -> torch.LongTensor:
    """[nsamples, seqlen] token ids: nsamples random windows of seqlen tokens, reproducible from seed."""
    if not _is_int(nsamples) or nsamples < 1:
        raise UsageError(f"calibration needs nsamples >= 1, got {nsamples!r}")
    if not _is_int(seqlen) or seqlen < 2:
        raise UsageError(f"calibration needs seqlen >= 2, got {seqlen!r}")
    if not _is_int(seed) or not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UsageError(f"calibration seed must be an integer in [-2**63, 2**64), got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    names = _normalise(sources)

    sampled = [n for n in names if n in PRESETS and PRESETS[n]["sampling"] == "documents"]
    if sampled:
        if len(names) != 1:
            raise UsageError(
                f"preset {sampled[0]!r} samples whole documents for calibration and cannot be "
                f"combined with other sources (got {', '.join(names)})"
            )
        return _document_windows(tokenizer, sampled[0], nsamples, seqlen, generator)

    segments = _segments(names, "calibration", max_bytes)
    label = ", ".join(label for label, _, _ in segments)
    # Each source joined with its own joiner, sources joined with "\n\n"; one tokenisation.
    text = "\n\n".join(joiner.join(docs) for _, docs, joiner in segments)
    ids = _encode(tokenizer, text, what=f"calibration text from {label}")  # [T]
    if ids.numel() < seqlen:
        raise UsageError(
            f"calibration text from {label} has {ids.numel()} tokens, fewer than one window of "
            f"seqlen={seqlen} tokens"
        )
    if nsamples * seqlen * 8 > _memory_bytes():
        raise UsageError(f"{nsamples} calibration windows of {seqlen} tokens do not fit in this machine's memory")
    # Start offsets uniform over every full window, [nsamples]; windows [nsamples, seqlen].
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seqlen)]


def evaluation_ids(tokenizer, sources: Sequence[str] | None, max_tokens: int | None, window: int | None = None,
                   flag: str = "--eval-seqlen", max_bytes: int | None = None) -> torch.LongTensor:
    """[T] token ids: the evaluation texts joined with "\\n\\n", tokenised once, truncated to max_tokens;
    refused when shorter than one perplexity window of ``window`` tokens (named by ``flag``)."""
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 2):
        raise UsageError(f"evaluation needs max_tokens >= 2 (or none), got {max_tokens!r}")
    segments = _segments(sources, "evaluation", max_bytes)
    label = ", ".join(label for label, _, _ in segments)
    text = "\n\n".join(doc for _, docs, _ in segments for doc in docs)
    # [T], tokenised once: no boundary effects between documents
    ids = _encode(tokenizer, text, what=f"evaluation text from {label}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise UsageError(f"evaluation text from {label} has {ids.numel()} tokens; at least 2 are needed")
    if window is not None and ids.numel() < window:
        raise UsageError(f"evaluation data has {ids.numel()} tokens, fewer than one {flag} window of {window}")
    return ids


# ----------------------------------------------------------------------------- sources


def _normalise(sources: Sequence[str] | None) -> list[str]:
    """The list of source strings; None or empty means the default corpus."""
    if sources is None:
        return [DEFAULT_SOURCE]
    if isinstance(sources, (str, os.PathLike)):  # a lone string would otherwise iterate its characters
        sources = [sources]
    names = []
    for s in sources:
        if not isinstance(s, (str, os.PathLike)) or not os.fspath(s).strip():
            raise UsageError(f"data source must be a non-empty string, got {s!r}")
        names.append(os.fspath(s))
    return names or [DEFAULT_SOURCE]


def check_sources(sources: Sequence[str] | None) -> None:
    """Refuse, before any work, a source that is neither a file, a folder, a preset nor default,
    and a folder holding a data file that is not a regular file (a FIFO, a link to a device)."""
    for source in _normalise(sources):
        if _source_kind(source) == "folder":
            _folder_files(source)


def _source_kind(source: str) -> str:
    """"default", "preset", "folder" or "file"; a one-line UsageError for anything else."""
    if source == DEFAULT_SOURCE:
        return "default"
    if source in PRESETS:
        return "preset"
    if os.path.isdir(source):
        return "folder"
    if os.path.isfile(source):
        return "file"
    if os.path.exists(source):
        raise UsageError(f"data source {source!r} is neither a regular file nor a folder")
    if _looks_like_path(source):
        raise UsageError(f"data file or folder not found: {source!r}")
    raise UsageError(
        f"unknown data source {source!r}: not a file or folder, and not one of "
        f"{', '.join([DEFAULT_SOURCE, *sorted(PRESETS)])}"
    )


def _segments(sources: Sequence[str] | None, part: str,
              max_bytes: int | None = None) -> list[tuple[str, list[str], str]]:
    """(label, documents, calibration joiner) for each source, in the order given."""
    if part not in PARTS:
        raise UsageError(f"data part must be 'calibration' or 'evaluation', got {part!r}")
    budget = _Budget(check_max_bytes(max_bytes) if max_bytes is not None else _MAX_DATA_BYTES.get())
    out = []
    for source in _normalise(sources):
        kind = _source_kind(source)
        if kind == "default":
            out.append((source, _default_texts(part), "\n\n"))
        elif kind == "preset":
            out.append((f"preset {source!r}", _preset_texts(source, part), PRESETS[source]["joiner"]))
        elif kind == "folder":
            out.append((f"folder {source!r}", _folder_texts(source, budget), "\n\n"))
        else:
            out.append((f"file {source!r}", _file_texts(source, budget), "\n\n"))
    return out


def _looks_like_path(source: str) -> bool:
    """True when the user evidently meant a path (separator or a known suffix)."""
    return "/" in source or os.sep in source or source.lower().endswith(_SUFFIXES) or source.startswith(".")


# ----------------------------------------------------------------------------- local files


class _Budget:
    """Bytes of local text (after decompression) that one part may still read."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.limit - self.used

    def refuse(self, path: str):
        return UsageError(
            f"data file {path!r} takes the local data past --max-data-bytes {self.limit} (bytes of text "
            f"after decompression, all files of the part together): a decompression bomb, or raise the cap"
        )

    def take(self, nbytes: int, path: str) -> None:
        if nbytes > self.remaining:
            raise self.refuse(path)
        self.used += nbytes


def _folder_texts(folder: str, budget: _Budget) -> list[str]:
    """Documents of every supported file under folder, recursively, sorted by relative path."""
    return [doc for path in _folder_files(folder) for doc in _file_texts(path, budget)]


def _folder_files(folder: str) -> list[str]:
    """Paths of the supported files under folder, recursively, sorted by relative path; refused
    (before any is read) unless every one is a regular file."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(_SUFFIXES):
                path = os.path.join(root, f)
                found.append((os.path.relpath(path, folder).replace(os.sep, "/"), path))
    if not found:
        raise UsageError(f"folder {folder!r} holds no {', '.join(sorted(_SUFFIXES))} files")
    paths = [path for _, path in sorted(found)]
    for path in paths:  # every file is a regular one before any is read
        _check_regular(path, os.stat, "data file")
    return paths


def _file_texts(path: str, budget: _Budget) -> list[str]:
    """Documents of one local file, by suffix."""
    lower = path.lower()
    if lower.endswith((".txt", ".txt.gz")):
        text = _read_text(path, budget)
        if not text.strip():
            raise UsageError(f"data file {path!r} is empty")
        return [text]
    if lower.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_texts(path, budget)
    if lower.endswith(".parquet"):
        return _parquet_texts(path, budget)
    raise UsageError(f"data file {path!r} has an unsupported type; use {', '.join(sorted(_SUFFIXES))}")


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _check_regular(path: str, stat_call, what: str) -> os.stat_result:
    """``stat_call(path)`` (os.stat, or os.fstat of an open descriptor), refused unless it is a
    regular file; the message names the kind, and the link's target when path is a symlink."""
    try:
        status = stat_call(path)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path!r}: {_reason(e)}") from e
    if not stat.S_ISREG(status.st_mode):
        kind = next((words for test, words in _FILE_KINDS if test(status.st_mode)), "not a plain file")
        name = path if isinstance(path, str) else "(open file)"
        via = f" (a link to {os.path.realpath(name)!r})" if isinstance(path, str) and os.path.islink(path) else ""
        raise UsageError(f"{what} {name!r}{via} is {kind}, not a regular file: only regular files are read")
    return status


def open_regular_file(path: str, what: str = "data file"):
    """``path`` opened for binary reading, only if it is a regular file (after symbolic links).

    Checked before opening (os.stat) and again on the open descriptor (the path may have been
    swapped in between); O_NONBLOCK makes even that open return at once on a FIFO, where a
    plain open would wait for a writer forever.
    """
    _check_regular(path, os.stat, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path!r}: {_reason(e)}") from e
    try:
        _check_regular(fd, os.fstat, what)
    except UsageError:
        os.close(fd)
        raise UsageError(f"{what} {path!r} is not a regular file any more: only regular files are read") from None
    os.set_blocking(fd, True)  # reads of a regular file never block; the flag was for the open only
    return os.fdopen(fd, "rb")


def read_at_most(stream, limit: int, on_too_big, check=None) -> bytes:
    """All of a binary stream, in 1 MiB chunks, raising ``on_too_big()`` once it passes ``limit``
    bytes (so memory stays below limit + 1 MiB); ``check(chunk)`` may refuse a chunk early."""
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(_READ_CHUNK, limit - total + 1))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise on_too_big()
        if check is not None:
            check(chunk)
        chunks.append(chunk)


def _refuse_nul(path: str):
    def check(chunk: bytes) -> None:
        if b"\x00" in chunk:
            raise UsageError(f"data file {path!r} contains NUL bytes: is it binary?")
    return check


def _read_bytes(path: str, budget: _Budget) -> bytes:
    """The bytes of a local file, gunzipped when its name ends in .gz, within the budget.

    A .gz file is decompressed twice: first only counting (constant memory), so that a small file
    expanding past the cap is refused without holding gigabytes, then to keep the bytes.
    """
    too_big = lambda: budget.refuse(path)
    no_nul = _refuse_nul(path)
    with open_regular_file(path) as fh:
        if not path.lower().endswith(".gz"):
            if os.fstat(fh.fileno()).st_size > budget.remaining:
                raise too_big()
            return read_at_most(fh, budget.remaining, too_big, no_nul)
        with gzip.GzipFile(fileobj=fh, mode="rb") as counting:
            total = 0
            while chunk := counting.read(_READ_CHUNK):
                total += len(chunk)
                if total > budget.remaining:
                    raise too_big()
                no_nul(chunk)
        fh.seek(0)
        with gzip.GzipFile(fileobj=fh, mode="rb") as stream:
            return read_at_most(stream, budget.remaining, too_big, no_nul)


def _read_text(path: str, budget: _Budget) -> str:
    """The UTF-8 text of a file, gunzipped when its name ends in .gz; counted against the budget."""
    try:
        raw = _read_bytes(path, budget)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UsageError(f"cannot read data file {path!r}: {_reason(e)}") from e
    budget.take(len(raw), path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path!r} is not UTF-8 text (byte {e.start}): is it binary?") from e
    if "\x00" in text:
        raise UsageError(f"data file {path!r} contains NUL bytes: is it binary?")
    return text.removeprefix("\ufeff")  # a byte-order mark is not text


def _jsonl_texts(path: str, budget: _Budget) -> list[str]:
    """The ``text`` field of every JSON line; blank lines are skipped."""
    docs = []
    # Split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for lineno, line in enumerate(_read_text(path, budget).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
            raise UsageError(f"data file {path!r} line {lineno} is not JSON: {_reason(e)}") from e
        if not isinstance(record, dict) or "text" not in record:
            raise UsageError(f"data file {path!r} line {lineno} has no 'text' field")
        if not isinstance(record["text"], str):
            raise UsageError(f"data file {path!r} line {lineno}: 'text' is not a string")
        docs.append(record["text"])
    if not any(d.strip() for d in docs):
        raise UsageError(f"data file {path!r} is empty (no text in its 'text' fields)")
    return docs


def _parquet_texts(path: str, budget: _Budget) -> list[str]:
    """The ``text`` column of a parquet file; null rows are skipped.

    Bounded twice: the column's uncompressed size in the file's metadata must fit the budget
    before anything is read, and each batch is read dictionary-encoded, its decoded size
    (sum of the referenced values' lengths) counted before its strings are made, so a value
    repeated a million times through a dictionary is refused rather than materialised.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    docs = []
    try:
        with open_regular_file(path) as fh:
            parquet = pq.ParquetFile(fh)
            names = parquet.schema_arrow.names
            if "text" not in names:
                raise UsageError(f"data file {path!r} has no 'text' column (columns: {', '.join(names)})")
            field = parquet.schema_arrow.field("text").type
            value_type = field.value_type if pa.types.is_dictionary(field) else field
            if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
                raise UsageError(f"data file {path!r}: column 'text' holds {value_type}, not strings")
            column = names.index("text")
            meta = parquet.metadata
            stored = sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
            if stored > budget.remaining:
                raise budget.refuse(path)
            parquet = pq.ParquetFile(fh, read_dictionary=["text"])
            for batch in parquet.iter_batches(batch_size=4096, columns=["text"]):
                values = batch.column(0)
                if pa.types.is_dictionary(values.type):
                    lengths = pc.take(pc.binary_length(values.dictionary), values.indices)
                else:
                    lengths = pc.binary_length(values)
                budget.take(pc.sum(lengths).as_py() or 0, path)
                docs.extend(d for d in values.to_pylist() if d is not None)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"data file {path!r} is not a readable parquet file: {_reason(e)}") from e
    if not any(d.strip() for d in docs):
        raise UsageError(f"data file {path!r} is empty (no text in its 'text' column)")
    return docs


# ----------------------------------------------------------------------------- default corpus


def _default_texts(part: str) -> list[str]:
    """The default corpus's documents for part (a fresh list; the cache stays untouched)."""
    return list(_default_part(part))


@functools.lru_cache(maxsize=2)
def _default_part(part: str) -> tuple[str, ...]:
    """Documents of one part: files hashed into it, capped in hash order, in path order."""
    want_eval = part == "evaluation"
    chosen = [(h, rel, doc) for h, rel, doc in _stdlib_documents() if (h % _EVAL_BUCKETS == 0) == want_eval]
    # Cap deterministically: take files in hash order (a fixed pseudo-random sample of the
    # library, not its alphabetical start) until the character budget is spent.
    kept, used = [], 0
    for _h, rel, doc in sorted(chosen):
        if kept and used + len(doc) > _DEFAULT_MAX_CHARS[part]:
            break
        kept.append((rel, doc))
        used += len(doc)
    if not kept:
        raise UsageError(
            f"data source 'default' found no standard-library docstrings under "
            f"{sysconfig.get_paths()['stdlib']!r}; pass calibration/evaluation files instead"
        )
    return tuple(doc for _, doc in sorted(kept))


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[int, str, str], ...]:
    """(hash, relative path, docstrings) for every stdlib .py file with docstrings, path order.

    Source files are parsed with ``ast``, never imported (imports can have side effects).
    A document is one file's module, class and function docstrings in source order, joined with
    "\\n\\n". Identical documents are kept once (first path), so the two parts never share one.
    Takes ~3 s on CPython 3.11 (ast.parse of ~12 MB of source in 734 files), once per process.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    out, seen = [], set()
    # ast.parse allocates ~1.2M nodes; with torch loaded the cyclic GC then costs ~2 s of the
    # ~4.5 s. AST trees hold no reference cycles (refcounting frees them), so pause the GC.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rel in sorted(files):
            try:
                with open(os.path.join(root, rel), "rb") as fh:
                    source = fh.read()
                with warnings.catch_warnings():  # e.g. SyntaxWarning for old escape sequences
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source, filename=rel)
            except (OSError, SyntaxError, ValueError):  # unreadable or not this Python's syntax
                continue
            doc = "\n\n".join(_docstrings(tree))
            if doc and doc not in seen:
                seen.add(doc)
                digest = hashlib.sha256(rel.encode("utf-8")).digest()
                out.append((int.from_bytes(digest[:8], "big"), rel, doc))
    finally:
        if gc_was_enabled:
            gc.enable()
    return tuple(out)


def _docstrings(tree: ast.AST) -> list[str]:
    """Module, class and function docstrings in source order (nested ones included)."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.expr):  # expressions hold no docstrings; skip them fast
                visit(child)

    visit(tree)
    return found


# ----------------------------------------------------------------------------- presets


def _preset_texts(name: str, part: str) -> list[str]:
    """The preset's documents for part (rows of its text field)."""
    spec = PRESETS[name]
    dataset = _preset_dataset(name, part)
    limit = spec["max_documents"][part]
    if limit is not None:
        return list(dataset[: min(limit, len(dataset))][spec["field"]])
    return list(dataset[spec["field"]])


def _preset_dataset(name: str, part: str):
    """``datasets.load_dataset`` with the preset's arguments; every failure is a UsageError."""
    spec = PRESETS[name]
    what = f"dataset {spec['path']!r}" + (f", config {spec['name']!r}" if spec["name"] else "")
    data_files = spec["data_files"][part]
    if data_files:
        what += f", data_files {', '.join(data_files.values())}"
    what += f", split {spec['split'][part]!r}"
    try:
        import datasets
    except ImportError as e:
        raise UsageError(f"preset {name!r} needs the 'datasets' package: pip install datasets") from e

    where = ""
    try:
        with offline_unless_hub_reachable() as where:
            dataset = datasets.load_dataset(
                spec["path"], spec["name"], data_files=data_files, split=spec["split"][part]
            )
    except Exception as e:  # network, cache, format: all mean "this preset is not available here"
        raise UsageError(
            f"cannot load preset {name!r} ({what}): {where}{_reason(e)}; it needs the Hugging Face "
            f"Hub or a local datasets cache"
        ) from e
    if spec["field"] not in dataset.column_names:
        raise UsageError(f"preset {name!r} ({what}) has no field {spec['field']!r}")
    return dataset


@contextmanager
def offline_unless_hub_reachable():
    """Force offline mode while the Hub cannot be reached; yield the words that explain a failure.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so we flip the module flags that
    ``datasets`` and ``huggingface_hub`` consult at call time, and restore them afterwards.
    """
    import datasets.config as ds_config
    from huggingface_hub import constants as hub_constants

    if ds_config.HF_HUB_OFFLINE or hub_constants.HF_HUB_OFFLINE:
        yield "offline mode is set (HF_HUB_OFFLINE) and the local datasets cache failed: "
        return
    if _hub_reachable():
        yield ""
        return
    saved = (ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    ds_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield "the Hugging Face Hub is unreachable and the local datasets cache failed: "
    finally:
        ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _document_windows(
    tokenizer, name: str, nsamples: int, seqlen: int, generator: torch.Generator
) -> torch.LongTensor:
    """[nsamples, seqlen]: per sample a random document with >= seqlen tokens, a random window in it."""
    spec = PRESETS[name]
    dataset = _preset_dataset(name, "calibration")
    ndocs = len(dataset)
    if ndocs == 0:
        raise UsageError(f"preset {name!r} calibration split is empty")
    windows, draws = [], 0
    max_draws = max(_MIN_DRAWS, _DRAWS_PER_SAMPLE * nsamples)
    while len(windows) < nsamples:
        if draws >= max_draws:
            raise UsageError(
                f"preset {name!r}: only {len(windows)} of {nsamples} random documents had at least "
                f"seqlen={seqlen} tokens in {draws} draws; use a shorter seqlen"
            )
        draws += 1
        index = int(torch.randint(ndocs, (1,), generator=generator))
        ids = _encode(tokenizer, dataset[index][spec["field"]])  # [L]
        if ids.numel() < seqlen:
            continue
        start = int(torch.randint(ids.numel() - seqlen + 1, (1,), generator=generator))
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


# ----------------------------------------------------------------------------- helpers


def _encode(tokenizer, text: str, chunk_chars: int = 1 << 16, what: str = "the text",
            max_uncut_chars: int = MAX_UNCUT_CHARS) -> torch.LongTensor:
    """[T] ids of text, no special tokens (no BOS in the middle of windows): the ids one
    tokeniser call on the whole text gives, computed piece by piece.

    A fast tokeniser holds ~500 bytes per token while it encodes (offsets, alignments, token
    strings): 200 MB for two novels, more than a streamed SmolLM2 layer pass needs. So the text is
    cut about every ``chunk_chars`` characters, only at a single white space character that
    follows a non-space and precedes a letter, and only where tokenising 256 characters either
    side of the cut as one piece gives the same ids as the two halves (for byte-level BPE a cut
    before " word" is a pre-token boundary; a tokeniser that adds a prefix space or reads across
    words fails the check and is left uncut).

    A stretch of more than ``max_uncut_chars`` characters without a single candidate cut (no white
    space before a letter: a 200 MB "word", base64, digits) is refused with a UsageError naming
    ``what``: handed to the tokenizer whole it costs ~1 us per character and, at hundreds of
    megabytes, aborts the process inside the Rust tokenizer.
    """
    pieces, start, lo, bare = [], 0, chunk_chars, 0
    while len(text) - lo > chunk_chars:  # look for a cut in [lo, lo + chunk_chars)
        cut = _safe_cut(tokenizer, text, lo, lo + chunk_chars)
        if cut is None:  # none here: this stretch joins the current piece
            bare = bare + chunk_chars if _CUT.search(text, lo, lo + chunk_chars) is None else 0
            if bare > max_uncut_chars:
                raise UsageError(
                    f"{what} has more than {max_uncut_chars:,} characters in a row (before character "
                    f"{lo + chunk_chars:,}) with no white space before a letter, so it cannot be cut into "
                    f"pieces a tokenizer can take: is it text?")
            lo += chunk_chars
            continue
        bare = 0
        pieces.append(torch.tensor(_encode_piece(tokenizer, text[start:cut]), dtype=torch.long))
        start, lo = cut, cut + chunk_chars
    pieces.append(torch.tensor(_encode_piece(tokenizer, text[start:]), dtype=torch.long))
    return torch.cat(pieces)


_CUT = re.compile(r"(?<=\S)\s(?=[^\W\d_])")  # one white space after a non-space, before a letter


def _safe_cut(tokenizer, text: str, lo: int, hi: int, context: int = 256, tries: int = 8) -> int | None:
    """A position in [lo, hi) where the text can be cut without changing its ids, or None."""
    for match in itertools.islice(_CUT.finditer(text, lo, hi), tries):
        cut = match.start()
        left, right = text[max(cut - context, 0):cut], text[cut:cut + context]
        if _encode_piece(tokenizer, left + right) == _encode_piece(tokenizer, left) + _encode_piece(tokenizer, right):
            return cut
    return None


def _encode_piece(tokenizer, text: str) -> list[int]:
    # verbose=False: long texts are expected here; skip the "longer than model_max_length" warning.
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().total


def _is_int(x) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _reason(e: BaseException) -> str:
    """An exception as a short single line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
