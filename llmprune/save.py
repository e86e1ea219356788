"""Atomic Hugging Face output folders: weights, tokenizer, model card, and the run report.

Everything is written to a hidden temporary folder ``.<name>.tmp-<pid>-XXXX`` beside the target,
flushed to disk, and renamed into place at the end with a rename that never replaces anything,
so the target is either absent or complete; a folder being replaced (``--overwrite``, only an
empty folder or one llmprune wrote, see llmprune.guard) is swapped out in one atomic exchange
where the system has one, so it is at every moment either the old complete folder or the new
one. The target is locked for the whole save (llmprune.guard.claim_output), and each temporary
folder is locked by its process while it exists: a run that is killed leaves at most a hidden
temporary folder nobody holds, which the next save to the same target removes. Only safetensors
are written, and token-like secrets are redacted from the report and model card.
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
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, UsageError
from .guard import (  # noqa: F401
    Terminated,
    check_output_folder,
    claim_output,
    folder_unlocked,
    is_claimed,
    lock_folder,
    release_output,
    replaceable,
)
from .jsonreport import report_json
from .options import Option

log = logging.getLogger(__name__)

WRITTEN: list[Path] = []  # folders this process has put in place, so an interrupt can say so

# The writer's own options: every run that writes a folder has them.
WRITER_OPTIONS = (
    Option("save_format", str, "dense", "dense (default) | sparse: store each pruned linear weight as its non-zero "
           "values plus a bitmask (see llmprune.sparse_format)", choices=("dense", "sparse")),
)


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
        _after_step()
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
    _after_step()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _after_step()
    if getattr(config, "llmprune_layer_sizes", None):  # uneven layers: ship the modelling file
        shutil.copyfile(Path(__file__).parent / "models" / "modeling_llmprune.py", folder / "modeling_llmprune.py")
    _write_text(folder / "README.md", card)
    _after_step()
    _write_text(folder / "llmprune.json", report_json(report, indent=2, default=str) + "\n")  # valid JSON: no NaN


@contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False):
    """Yield a hidden temporary folder beside ``target`` to fill; when the block ends normally it
    is flushed to disk and put at ``target`` in one rename (see save_folder for the guarantees).
    An exception in the block removes it; a failed write becomes an OutputError. Streaming runs
    fill it shard by shard over a whole run. The target is claimed (checked, locked) here unless
    the caller claimed it already, and then released here."""
    claimed_here = not is_claimed(target)
    target = claim_output(target, overwrite)
    try:
        remove_stale_temporaries(target)  # under the target's lock: no run of ours is filling them
        with _filled_then_installed(target, overwrite) as tmp:
            yield tmp
    finally:
        if claimed_here:
            release_output(target)


@contextmanager
def _filled_then_installed(target: Path, overwrite: bool):
    tmp = None
    try:
        with _InterruptsHeld() as held:  # no folder may exist that ``tmp`` does not name yet
            tmp = _temporary_folder(target, "tmp")
        held.reraise()
        yield tmp
        _make_ordinary(tmp)
        _sync_folder(tmp)
        _after_step()
        with _InterruptsHeld() as held:  # never cut in half by Ctrl-C or SIGTERM
            old = _install(tmp, target, overwrite)
            _release_temporary(tmp)
            tmp = None
            WRITTEN.append(target)
            _after_step()
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                _release_temporary(old)
            try:  # the rename itself on disk; the folder is complete either way
                _fsync_path(target.parent)
            except OSError:
                pass
        held.reraise()  # the folder is complete; the interrupt still stops the run
    except BaseException as error:
        if tmp is not None:
            with _InterruptsHeld():
                shutil.rmtree(tmp, ignore_errors=True)
                _release_temporary(tmp)
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


# Called after each step of a save (weights, tokenizer, card, report, ...) when set: tests set it
# (in process, or in a small wrapper script around ``main``) to pause there and kill the process
# at chosen points inside a save. None in every real run.
AFTER_SAVE_STEP: Callable[[], None] | None = None


def _after_step() -> None:
    if AFTER_SAVE_STEP is not None:
        AFTER_SAVE_STEP()


_FOLDER_LOCKS: dict[Path, int] = {}  # temporary folders of this process -> descriptor holding their lock


def _temporary_folder(target: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>-XXXXXXXX`` beside the target, locked (flock on the folder) until it
    is put in place or removed: the lock, not the pid (wrong across process namespaces), tells a
    later run that its owner still lives; the pid is there for people reading the folder."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    descriptor = lock_folder(folder)
    if descriptor is not None:
        _FOLDER_LOCKS[folder] = descriptor
    return folder


def _release_temporary(folder: Path) -> None:
    descriptor = _FOLDER_LOCKS.pop(folder, None)
    if descriptor is not None:
        os.close(descriptor)


_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what runs killed while saving to ``target`` left beside it: hidden temporary folders
    whose lock nobody holds (their process is gone, whatever its namespace). A replacement cut
    between its two renames (only where the atomic exchange is unavailable) is rolled back: the
    old folder returns to ``target``. Folders whose lock is held, or cannot be tested, are left
    alone. Returns the removed folders."""
    removed = []
    prefix = f".{target.name}."
    try:
        entries = sorted(target.parent.iterdir())  # "old-" before "tmp-"
    except OSError:
        return removed
    for path in entries:
        match = _LEFTOVER.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        descriptor = folder_unlocked(path)
        if descriptor is None:  # a live run's, or unknown
            continue
        try:
            if match["kind"] == "old" and not os.path.lexists(target) and (path / target.name).is_dir():
                os.replace(path / target.name, target)
                log.warning("restored %s, which an interrupted run had moved aside", target)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(descriptor)
        log.warning("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


class _InterruptsHeld:
    """SIGINT (and SIGTERM, when a Python handler such as llmprune.guard.RunGuard's is installed)
    inside the block is held instead of raising in the middle of it; ``reraise()`` afterwards
    raises it (KeyboardInterrupt, or Terminated for SIGTERM). A no-op outside the main thread,
    and for a signal that is ignored."""

    def __init__(self):
        self.interrupted = None  # the signal number held
        self._previous = {}

    def _hold(self, signum, frame):
        self.interrupted = self.interrupted or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(signum)
                if previous in (signal.SIG_IGN, None) or (signum == signal.SIGTERM and not callable(previous)):
                    continue
                try:
                    signal.signal(signum, self._hold)
                    self._previous[signum] = previous
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False

    def reraise(self) -> None:
        if self.interrupted == signal.SIGTERM:
            raise Terminated()
        if self.interrupted:
            raise KeyboardInterrupt


_APPEARED = "something else was put there during this run"


def _install(tmp: Path, target: Path, overwrite: bool) -> Path | None:
    """Put the complete folder ``tmp`` at ``target``, never replacing anything unless
    ``overwrite`` (and then only an empty folder or one llmprune wrote, checked again now).
    Returns the folder now holding the replaced content, to be deleted, or None."""
    if os.path.lexists(target) and not overwrite:  # empty when checked: removed only if still empty
        try:
            os.rmdir(target)
        except OSError:
            raise OSError(errno.EEXIST, _APPEARED, str(target)) from None
    if not os.path.lexists(target):
        try:
            rename_no_replace(tmp, target)
        except FileExistsError:
            raise OSError(errno.EEXIST, _APPEARED, str(target)) from None
        return None
    if target.is_symlink() or not target.is_dir() or not replaceable(target):
        raise OSError(errno.EEXIST, "it is no longer empty or a folder llmprune wrote", str(target))
    if _exchange(tmp, target):  # one atomic step: target is old, then new
        return tmp
    old = _temporary_folder(target, "old")
    os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        _release_temporary(old)
        raise
    return old


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` only if nothing is at ``target`` (FileExistsError
    otherwise): Linux renameat2(RENAME_NOREPLACE) in one step; elsewhere a check, then a rename,
    safe against other llmprune runs because the caller holds the target's lock."""
    if _renameat2(source, target, 1):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (RENAME_EXCHANGE). False where unsupported."""
    return _renameat2(a, b, 2)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2: flags 1 RENAME_NOREPLACE (fails with FileExistsError when ``b`` exists),
    2 RENAME_EXCHANGE (swap two paths atomically). False where the kernel, file system or C
    library lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # kernel or file system lacks it
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(b))
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
    (re.compile(r"(?i)(\b(?:token|secret|password|passwd|api[_-]?key|access[_-]?key)"
                r"\s*[=:]\s*)[^\s'\"&,;]+"), r"\1***"),
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


# The card's sentence on how unstructured / N:M weights are stored (``convert`` swaps them).
CARD_STORAGE = {
    "dense": ("Unstructured and N:M sparsity is stored dense, with zeros in the removed positions: no sparse "
              "checkpoint format is written, so the files are as large as the base model's and the speed on "
              "ordinary kernels is unchanged."),
    "sparse": ("Each pruned linear weight is stored as its non-zero values plus a bitmask (llmprune's sparse "
               "format): load it with `trust_remote_code=True` or `llmprune.load_sparse`, which give the dense "
               "model; the speed on ordinary kernels is unchanged."),
}


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
        storage = (f"{_structured_removals(report)} removed for real: the matrices are smaller, and so are "
                   "the files and the compute per token.")
    else:
        summary = {"method": method, "pattern": report["prune"]["pattern"],
                   "target_sparsity": report["prune"]["target_sparsity"],
                   "realised_sparsity": round(report["prune"]["overall_sparsity"], 6)}
        schedule = report["prune"].get("schedule") or {}
        if schedule.get("name", "uniform") != "uniform":
            summary["schedule"] = schedule["name"]
            summary["realised_per_layer_sparsity"] = [round(x, 4) for x in report["prune"]["per_layer_sparsity"]]
        title = (f"{report['prune']['pattern']}, {report['prune']['overall_sparsity']:.1%} "
                 "of decoder linear weights removed")
        storage = CARD_STORAGE[report.get("save_format", "dense")]
    if ppl:
        summary["perplexity"] = {k: round(v["perplexity"], 4) for k, v in ppl.items()}
    license_id, origin = _base_model_facts(report.get("model"))
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["llmprune", "pruned", method],
             **({"license": license_id} if license_id else {}), "llmprune": summary}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(base_model).name} pruned with {method} ({title})", "",
             f"Made by llmprune (post-training pruning) from `{base_model}`." + (f" {origin}" if origin else ""), "",
             storage + " The embeddings and LM head are not pruned.", ""]
    if not license_id:
        lines += ["License: not recorded by llmprune; the base model's license applies (see its model card).", ""]
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


def _structured_removals(report: dict) -> str:
    """What a structured run removed, in words: layers only when some were, heads and FFN neurons
    when the report records that they were asked for (or cannot tell otherwise)."""
    structured = report["structured"]
    stages = [s.get("options", {}) for s in report.get("stages", []) if s.get("kind") == "structured"]
    options = {**report.get("prune", {}), **structured.get("options", {}), **(stages[0] if stages else {})}
    parts = []
    if "heads" not in options or options["heads"]:
        parts.append("attention heads")
    if "ffn" not in options or options["ffn"]:
        parts.append("FFN neurons")
    if structured.get("removed_layers"):
        parts.append(f"decoder layers {structured['removed_layers']}")
    if not parts:
        return "Nothing was"
    what = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return what[0].upper() + what[1:] + " were"


def _base_model_facts(model: str | None) -> tuple[str | None, str | None]:
    """The base model's license (Hub identifier, or None when unknown) and a note on where its
    weights came from. The built-in model's license is known; a local folder's is read from the
    YAML front matter of its own model card, when it has one."""
    from .models.loading import ALIASES

    if model in ALIASES:
        return "apache-2.0", ("The base weights are the built-in SmolLM2-135M-Instruct: 4-bit GGUF values (Q4_1) "
                              "de-quantised to float32, so they differ slightly from the original release.")
    card = Path(model) / "README.md" if model else None
    if card is not None and card.is_file():
        import yaml

        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError:
                front = None
            if isinstance(front, dict) and isinstance(front.get("license"), str):
                return front["license"], None
    return None, None
