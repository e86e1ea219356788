"""Atomic Hugging Face output folders: weights, tokenizer, model card, and the run report.

Everything is written to a hidden temporary folder ``.<name>.tmp-<pid>-XXXX`` beside the target,
flushed to disk, and renamed into place at the end, so the target is either absent or complete;
a folder being replaced (``--overwrite``) is swapped out in one atomic exchange where the system
has one, so it is at every moment either the old complete folder or the new one. A run that is
killed leaves at most a hidden temporary folder, which the next save to the same target removes
(its owner process, named in the folder name, is gone). Only safetensors are written, and token-
like secrets are redacted from the report and model card.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, UsageError
from .options import Option

log = logging.getLogger(__name__)

WRITTEN: list[Path] = []  # folders this process has put in place, so an interrupt can say so

# The writer's own options: every run that writes a folder has them.
WRITER_OPTIONS = (
    Option("save_format", str, "dense", "dense (default) | sparse: store each pruned linear weight as its non-zero "
           "values plus a bitmask (see llmprune.sparse_format)", choices=("dense", "sparse")),
)


def check_output_folder(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse (before any work) a target that exists and is not empty, unless overwrite, and one
    that could never be written (its parent is a file, its name leaves no room for the temporary
    folder's)."""
    if not os.fspath(path):
        raise UsageError("--output must name a folder, got ''")
    try:  # an unknown ~user, a name longer than the file system allows
        target = Path(path).expanduser().resolve()
        spare = _name_max(target.parent) - len(os.fsencode(f".{target.name}.tmp-{os.getpid()}-")) - 8
        if spare < 0:
            raise UsageError(f"output folder name is {-spare} bytes too long to be written beside its "
                             f"temporary folder: {target.name[:40]!r}...")
        exists, is_dir = target.exists(), target.is_dir()
    except (OSError, RuntimeError) as error:
        raise UsageError(f"--output {os.fspath(path)!r}: {getattr(error, 'strerror', None) or error}") from None
    if exists and not is_dir:
        raise UsageError(f"output {str(target)!r} exists and is not a folder")
    if is_dir and any(target.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(target)!r} is not empty; pass --overwrite to replace it")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot create {str(target)!r}: {str(parent)!r} is not a folder")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create {str(parent)!r}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write in {str(parent)!r}")
    return target


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) of the file system that holds ``folder`` or its nearest ancestor."""
    for candidate in (folder, *folder.parents):
        try:
            return os.pathconf(candidate, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def save_folder(model, tokenizer, target: str | os.PathLike, report: dict, card: str,
                overwrite: bool = False, extra_files=None, save_format: str = "dense") -> Path:
    """Write model + tokenizer + README.md + llmprune.json to ``target`` atomically.

    Killed at any moment, ``target`` is absent, the old folder (when replacing one) or the complete
    new one. Ctrl-C (KeyboardInterrupt) removes the temporary folder; an interrupt that arrives
    while the folder is being put in place is held until that is done. A failed write (disk full,
    permission lost) raises OutputError with nothing left behind and an old folder kept.
    extra_files(folder): writes more files into the temporary folder before it is put in place.
    save_format: "dense", or "sparse" (llmprune.sparse_format rewrites the weights in the temporary folder).
    """
    if save_format == "sparse":
        from .sparse_format import check_can_be_sparse

        check_can_be_sparse(model.config)
    with atomic_folder(target, overwrite) as tmp:
        _test_pause()
        model.save_pretrained(tmp, safe_serialization=True)
        if extra_files is not None:
            extra_files(tmp)
        write_companions(tmp, model.config, tokenizer, report, card)
        if save_format == "sparse":
            from .sparse_format import pruned_weight_names, sparsify_folder

            sparsify_folder(tmp, pruned_weight_names(model))  # refuses a model with no zeros to gain from
    return Path(target).expanduser().resolve()


def write_companions(folder: Path, config, tokenizer, report: dict, card: str) -> None:
    """Everything of an output folder but the weights: tokenizer, llmprune's modelling file for
    uneven layers, README.md (model card) and llmprune.json (report), secrets redacted."""
    report, card = redact(report), redact(card)
    _test_pause()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _test_pause()
    if getattr(config, "llmprune_layer_sizes", None):  # uneven layers: ship the modelling file
        shutil.copyfile(Path(__file__).parent / "models" / "modeling_llmprune.py", folder / "modeling_llmprune.py")
    _write_text(folder / "README.md", card)
    _test_pause()
    _write_text(folder / "llmprune.json", json.dumps(report, indent=2, default=str) + "\n")


@contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False):
    """Yield a hidden temporary folder beside ``target`` to fill; when the block ends normally it
    is flushed to disk and put at ``target`` in one rename (see save_folder for the guarantees).
    An exception in the block removes it; a failed write becomes an OutputError. Streaming runs
    fill it shard by shard over a whole run."""
    remove_stale_temporaries(Path(target).expanduser().resolve())
    target = check_output_folder(target, overwrite)
    tmp = None
    try:
        with _InterruptsHeld() as held:  # no folder may exist that ``tmp`` does not name yet
            tmp = _temporary_folder(target, "tmp")
        if held.interrupted:
            raise KeyboardInterrupt
        yield tmp
        _make_ordinary(tmp)
        _sync_folder(tmp)
        _test_pause()
        with _InterruptsHeld() as held:  # never cut in half by Ctrl-C
            old = _install(tmp, target)
            tmp = None
            WRITTEN.append(target)
            _test_pause()
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            try:  # the rename itself on disk; the folder is complete either way
                _fsync_path(target.parent)
            except OSError:
                pass
        if held.interrupted:  # the folder is complete; the interrupt still stops the run
            raise KeyboardInterrupt
    except BaseException as error:
        if tmp is not None:
            with _InterruptsHeld():
                shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(error) if isinstance(error, Exception) and not isinstance(error, UsageError) else None
        if cause is not None:
            kept = " (the existing folder is unchanged)" if target.exists() else ""
            raise OutputError(f"cannot write the output folder {str(target)!r}: "
                              f"{cause.strerror or cause}; nothing was saved{kept}") from error
        raise


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                       "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class StoredBytes:
    """A tensor left where it is: ``size`` bytes at ``start`` of ``path`` (another safetensors
    file), with its safetensors dtype name and shape. Copied in chunks, never loaded whole."""

    def __init__(self, path: str, start: int, size: int, dtype: str, shape: list[int]):
        self.path, self.start, self.size, self.dtype, self.shape = path, start, size, dtype, shape


def write_safetensors(tensors: dict, path: Path) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory, or copied in
    chunks from another file (StoredBytes); safetensors' save_file would first copy every tensor
    into one bytes object, twice the shard in memory. Format: 8-byte little-endian header
    length, JSON header (dtype, shape, byte offsets), the data."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        if isinstance(tensor, StoredBytes):
            size, dtype, shape = tensor.size, tensor.dtype, tensor.shape
        else:
            size = tensor.numel() * tensor.element_size()
            dtype, shape = SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")], list(tensor.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            if isinstance(tensor, StoredBytes):
                with open(tensor.path, "rb") as source:
                    source.seek(tensor.start)
                    left = tensor.size
                    while left:
                        chunk = source.read(min(left, 2**22))
                        if not chunk:
                            raise OSError(f"{tensor.path} ends early")
                        handle.write(chunk)
                        left -= len(chunk)
            elif tensor.numel():
                handle.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


class ShardWriter:
    """Writes tensors to ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) plus ``model.safetensors.index.json``, as
    ``save_pretrained`` does, but a tensor at a time: only the shard being filled is in memory."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2**30):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # per shard written: its tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        """``tensor``: a torch tensor, or StoredBytes to copy from another file."""
        size = tensor.size if isinstance(tensor, StoredBytes) else tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor if isinstance(tensor, StoredBytes) else tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        write_safetensors(self.pending, self.folder / f"shard-{len(self.files):05d}.tmp")
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Name the shards ``model-0000i-of-0000N.safetensors`` and write the index; return the shards."""
        self.flush()
        count, weight_map, paths = len(self.files), {}, []
        for number, names in enumerate(self.files):
            path = self.folder / f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f"shard-{number:05d}.tmp", path)
            weight_map.update({name: path.name for name in names})
            paths.append(path)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        _write_text(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return paths


def _test_pause() -> None:
    """Tests only: ``LLMPRUNE_TEST_SAVE_DELAY=<seconds>`` sleeps between the steps of a save, so
    that a test can kill the process at chosen points inside it."""
    try:
        delay = float(os.environ.get("LLMPRUNE_TEST_SAVE_DELAY", "0") or 0)
    except ValueError:
        return
    if delay > 0:
        time.sleep(delay)


def _temporary_folder(target: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>-XXXXXXXX`` beside the target: the pid tells a later run whether the
    owner is still alive."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what runs killed while saving to ``target`` left beside it: hidden temporary folders
    whose owner process is gone. A replacement cut between its two renames (only where the atomic
    exchange is unavailable) is rolled back: the old folder returns to ``target``. Folders of live
    processes are left alone. Returns the removed folders."""
    removed = []
    prefix = f".{target.name}."
    try:
        entries = sorted(target.parent.iterdir())  # "old-" before "tmp-"
    except OSError:
        return removed
    for path in entries:
        match = _LEFTOVER.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if match is None or path.is_symlink() or not path.is_dir() or _process_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(target) and (path / target.name).is_dir():
            os.replace(path / target.name, target)
            log.warning("restored %s, which an interrupted run had moved aside", target)
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (process %s)", path, match["pid"])
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (zombies count as gone); unknown means alive."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no harmless probe (os.kill would terminate it): never remove
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class _InterruptsHeld:
    """SIGINT inside the block is held (``interrupted`` becomes true) instead of raising
    KeyboardInterrupt in the middle of it; the caller decides what to do afterwards. A no-op
    outside the main thread, and when SIGINT is ignored."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def _hold(self, signum, frame):
        self.interrupted = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):
                try:
                    signal.signal(signal.SIGINT, self._hold)
                    self._previous = previous
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _install(tmp: Path, target: Path) -> Path | None:
    """Put the complete folder ``tmp`` at ``target``. Returns the folder now holding the replaced
    content, to be deleted, or None."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return None
    if _exchange(tmp, target):  # one atomic step: target is old, then new
        return tmp
    old = _temporary_folder(target, "old")
    os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # kernel or file system lacks it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (folders: where the OS allows opening them)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:
        if not path.is_dir() or error.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    """Every file, then the folder itself, on disk before the rename makes them visible: a crash
    of the machine must not leave a complete-looking folder with empty files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync_path(path)
    _fsync_path(folder)


def _os_error(error: BaseException) -> OSError | None:
    """The operating-system error behind a failed write: the exception itself, its cause, or the
    one that safetensors' Rust writer describes only in text ("... No space left on device (os error 28)")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        match = re.search(r"\bOs \{ code: (\d+)|\(os error (\d+)\)", str(error))
        if match:
            code = int(match[1] or match[2])
            return OSError(code, os.strerror(code))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


_SECRET_VARIABLE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
_SECRET_TEXT = [
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_***"),  # Hugging Face access tokens
    (re.compile(r"\b(ghp|gho|ghu|ghs|ghr|github_pat|glpat|sk|xox[abposr])([-_])[A-Za-z0-9_\-]{16,}"), r"\1\2***"),
    (re.compile(r"(?i)(\b(?:token|secret|password|passwd|api[_-]?key|access[_-]?key)\s*[=:]\s*)[^\s'\"&,;]+"), r"\1***"),
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), r"\1***@"),  # passwords in URLs
]


def redact(value):
    """A copy of ``value`` (str, or dicts and lists of them) with secrets replaced by ``***``:
    Hugging Face and similar access tokens, ``token=...``-style values, passwords in URLs, and the
    values of environment variables whose names say token, secret, password or key."""
    if isinstance(value, str):
        for variable, secret in os.environ.items():
            if len(secret) >= 8 and _SECRET_VARIABLE.search(variable) and secret in value:
                value = value.replace(secret, "***")
        for pattern, replacement in _SECRET_TEXT:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def _make_ordinary(folder: Path) -> None:
    """mkdtemp (and some writers) make private files; the result is an ordinary folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def model_card(base_model: str, report: dict) -> str:
    """README.md with YAML front matter for the Hub, and the measured numbers with the protocol."""
    import yaml

    method = report["prune"]["method"]
    structured = report.get("structured")
    ppl = report.get("perplexity", {})
    speed = report.get("speed", {})
    params = report.get("parameters", {})
    if structured:
        summary = {"method": "structured", "score": structured["score"], "allocation": structured["allocation"],
                   "gqa": structured["gqa"], "removed_layers": structured["removed_layers"],
                   "parameters_before": structured["parameters_before"],
                   "parameters_after": structured["parameters_after"]}
        title = (f"{structured['parameters_after'] / structured['parameters_before']:.1%} of the parameters "
                 f"kept, {structured['score']} scores")
        storage = ("Attention heads, FFN neurons and layers were removed for real: the matrices are "
                   "smaller, and so are the files and the compute per token.")
    else:
        summary = {"method": method, "pattern": report["prune"]["pattern"],
                   "target_sparsity": report["prune"]["target_sparsity"],
                   "realised_sparsity": round(report["prune"]["overall_sparsity"], 6)}
        schedule = report["prune"].get("schedule") or {}
        if schedule.get("name", "uniform") != "uniform":
            summary["schedule"] = schedule["name"]
            summary["realised_per_layer_sparsity"] = [round(x, 4) for x in report["prune"]["per_layer_sparsity"]]
        title = f"{report['prune']['pattern']}, {report['prune']['overall_sparsity']:.1%} of decoder linear weights removed"
        storage = ("Unstructured and N:M sparsity is stored dense, with zeros in the removed positions: no "
                   "sparse checkpoint format is written, so the files are as large as the base model's and "
                   "the speed on ordinary kernels is unchanged.")
        if report.get("save_format") == "sparse":
            storage = ("Each pruned linear weight is stored as its non-zero values plus a bitmask (llmprune's "
                       "sparse format): load it with `trust_remote_code=True` or `llmprune.load_sparse`, which "
                       "give the dense model; the speed on ordinary kernels is unchanged.")
    if ppl:
        summary["perplexity"] = {k: round(v["perplexity"], 4) for k, v in ppl.items()}
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["llmprune", "pruned", method],
             "llmprune": summary}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(base_model).name} pruned with {method} ({title})", "",
             f"Made by [llmprune](https://pypi.org/project/llmprune/) from `{base_model}`.", "",
             storage + " The embeddings and LM head are not pruned.", ""]
    rows = []
    if params:
        rows.append(("parameters", f"{params['before']['nonzero']:,}", f"{params['after']['nonzero']:,}"))
    if report.get("weight_bytes"):
        before, after = report["weight_bytes"]["before"], report["weight_bytes"]["after"]
        rows.append(("weights (MiB)", f"{before / 2**20:.1f}", f"{after / 2**20:.1f}"))
    if ppl:
        rows.append(("perplexity", f"{ppl['dense']['perplexity']:.3f}", f"{ppl['pruned']['perplexity']:.3f}"))
    if speed:
        rows.append(("prefill tokens/s", f"{speed['dense']['prefill_tokens_per_s']:.0f}",
                     f"{speed['pruned']['prefill_tokens_per_s']:.0f}"))
        rows.append(("decode tokens/s", f"{speed['dense']['decode_tokens_per_s']:.1f}",
                     f"{speed['pruned']['decode_tokens_per_s']:.1f}"))
    if rows:
        lines += ["| | before | after |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]
    if ppl:
        lines += [f"Evaluation data: {report.get('eval_data')}. Protocol: {ppl['dense']['protocol']}.", ""]
    if speed:
        s = speed["dense"]
        lines += [f"Speed: one {s['prompt_tokens']}-token prompt (prefill) and {s['new_tokens']} greedy tokens "
                  f"(decode), {s['threads']} threads, on {report.get('device')}.", ""]
    if report["prune"].get("nsamples"):
        lines += [f"Calibration: {report['prune']['nsamples']} samples x {report['prune']['seqlen']} tokens "
                  f"from {report.get('calib_data')}, seed {report.get('seed')}.", ""]
    lines += [f"Command: `{report.get('command', '')}`", "",
              "Per-layer details and timings are in `llmprune.json`.", ""]
    return "\n".join(lines)
