"""What keeps a run from touching the user's own files: the output folder check, the lock on the
output folder, the lock on each temporary folder, and SIGTERM handled like Ctrl-C.

Every writer (a pruning run, a dynamic run, a recipe run, a sweep, the atomic writer in
llmprune.save) goes through ``check_output_folder`` and ``claim_output``:

- ``check_output_folder`` (read only, before any work) refuses a target that is, holds or lies
  inside a folder the run reads or works in (the input model, --checkpoint-dir, --offload-folder,
  --activations-on-disk), a target that is or holds the current folder, the home folder or ``/``,
  a non-empty folder without --overwrite, and with --overwrite any non-empty folder that llmprune
  did not write (it holds no ``llmprune.json``; ``sweep.json`` for sweeps). Symlinks and ``..``
  are resolved before comparing.
- ``claim_output`` (once every check has passed, before the model loads) creates the missing
  parent folders and takes an exclusive ``flock`` on ``.<name>.llmprune.lock`` beside the target,
  held until the run ends; a second run to the same target is refused at once.

The lock file is removed when the lock is released. That is safe because the holder removes it
while still holding the lock, and a run that has just acquired a lock checks that the path still
names the file it locked (same device and inode), retrying otherwise: a lock won on a file that
was removed meanwhile is never trusted. A run killed with SIGKILL leaves the lock file behind
(the kernel drops the lock itself); the next run to that target takes it over and removes it.
Where the file system has no ``flock`` (some network file systems), the run goes on without the
lock and says so in the log: the no-replace rename in llmprune.save still never replaces a
folder without --overwrite.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no locks (documented)
    fcntl = None

log = logging.getLogger(__name__)

MODEL_MARKER = "llmprune.json"  # the report every model folder llmprune writes holds
_MARKER_MAX_BYTES = 64 * 2**20


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs (the CLI
    exits with 143 instead of 130)."""


# ----------------------------------------------------------------------------- the check


def _resolved(path) -> Path:
    return Path(os.fspath(path)).expanduser().resolve()


def _related(a: Path, b: Path) -> str | None:
    """How folder ``a`` relates to folder ``b`` (both resolved): "is", "is inside", "holds" or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "holds"
    return None


def _home_folders() -> list[Path]:
    """$HOME and the password database's home folder of this user (they may differ)."""
    homes = []
    for home in (os.environ.get("HOME"), _passwd_home()):
        if home:
            try:
                homes.append(_resolved(home))
            except (OSError, RuntimeError):
                pass
    return list(dict.fromkeys(homes))


def _passwd_home() -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, OSError):
        return None


def _model_folder(model) -> Path | None:
    """The local folder a --model value names (a built-in alias: its converted copy), else None."""
    if not model:
        return None
    from .models.loading import ALIASES, cache_dir

    try:
        if model in ALIASES:
            return _resolved(cache_dir() / ALIASES[model])
        path = Path(str(model)).expanduser()
        return path.resolve() if path.exists() else None
    except (OSError, RuntimeError):
        return None


def _inputs(model=None, checkpoint_dir=None, offload_folder=None, activations_on_disk=None) -> list[tuple[str, Path]]:
    """(what, resolved folder) for every folder the run reads or works in; a work folder given as
    an existing non-folder is refused here, naming its flag."""
    found = []
    folder = _model_folder(model)
    if folder is not None:
        found.append(("the input model folder (--model)", folder))
    for flag, value in (("--checkpoint-dir", checkpoint_dir), ("--offload-folder", offload_folder),
                        ("--activations-on-disk", activations_on_disk)):
        if value is None or value is False or value == "":
            continue
        try:
            path = _resolved(value)
            exists, is_dir = path.exists(), path.is_dir()
        except (OSError, RuntimeError) as error:
            raise UsageError(f"{flag} {os.fspath(value)!r}: {getattr(error, 'strerror', None) or error}") from None
        if exists and not is_dir:
            raise UsageError(f"{flag} {str(path)!r} exists and is not a folder")
        found.append((f"the {flag} folder", path))
    return found


def made_by_llmprune(folder: Path, marker: str = MODEL_MARKER) -> bool:
    """Whether ``folder`` holds the report of an earlier llmprune run: ``marker`` as a regular file
    (not a link) holding a JSON object."""
    path = folder / marker
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MARKER_MAX_BYTES:
            return False
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def replaceable(folder: Path, marker: str = MODEL_MARKER) -> bool:
    """What --overwrite may replace: an empty folder or one llmprune wrote."""
    try:
        return not any(folder.iterdir()) or made_by_llmprune(folder, marker)
    except OSError:
        return False


_CHECKED: dict[Path, tuple[str, list]] = {}  # target -> (marker, inputs) of its check, for claim_output


def check_output_folder(path, overwrite: bool, *, marker: str = MODEL_MARKER, model=None, checkpoint_dir=None,
                        offload_folder=None, activations_on_disk=None) -> Path:
    """Refuse (UsageError, before any work, writing nothing) an output folder that would put the
    user's files at risk or could never be written; return it resolved. See the module docstring
    for the rules; ``marker`` is the file that says llmprune wrote a folder."""
    if not os.fspath(path):
        raise UsageError("--output must name a folder, got ''")
    try:  # an unknown ~user, a symlink loop
        target = _resolved(path)
    except (OSError, RuntimeError) as error:
        raise UsageError(f"--output {os.fspath(path)!r}: {getattr(error, 'strerror', None) or error}") from None
    inputs = _inputs(model, checkpoint_dir, offload_folder, activations_on_disk)
    _refuse_related(target, inputs)
    _check_target_itself(target, overwrite, marker)
    _CHECKED[target] = (marker, inputs)
    return target


def _refuse_related(target: Path, inputs: list[tuple[str, Path]]) -> None:
    if target == Path(target.anchor):
        raise UsageError(f"output folder {str(target)!r} is the root of the file system; choose another --output")
    for what, folder in inputs:
        relation = _related(target, folder)
        if relation is not None:
            raise UsageError(f"output folder {str(target)!r} {relation} {what} {str(folder)!r}; "
                             f"choose another --output")
    places = [("the current folder", Path.cwd().resolve())] + [("your home folder", h) for h in _home_folders()]
    for what, folder in places:
        relation = _related(target, folder)
        if relation in ("is", "holds"):
            raise UsageError(f"output folder {str(target)!r} {relation} {what} {str(folder)!r}; "
                             f"choose another --output")


def _check_target_itself(target: Path, overwrite: bool, marker: str) -> None:
    """Exists as a non-folder, non-empty, not llmprune's, name too long, unwritable parent. (Whether
    another run holds it is asked by claim_output only: with several processes (accelerate
    launch) the main one may claim it while the others still check.)"""
    try:
        spare = _name_max(target.parent) - len(os.fsencode(f".{target.name}.tmp-{os.getpid()}-")) - 8
        if spare < 0:
            raise UsageError(f"output folder name is {-spare} bytes too long to be written beside its "
                             f"temporary folder: {target.name[:40]!r}...")
        exists, is_dir = target.exists(), target.is_dir()
        nonempty = is_dir and any(target.iterdir())
    except OSError as error:
        raise UsageError(f"--output {str(target)!r}: {error.strerror or error}") from None
    if exists and not is_dir:
        raise UsageError(f"output {str(target)!r} exists and is not a folder")
    if nonempty and not overwrite:
        raise UsageError(f"output folder {str(target)!r} is not empty; pass --overwrite to replace it")
    if nonempty and not made_by_llmprune(target, marker):
        raise UsageError(f"output folder {str(target)!r} was not written by llmprune (it holds no {marker}); "
                         f"--overwrite replaces only llmprune's own folders or empty ones: nothing was changed")
    existing = next((p for p in (target.parent, *target.parent.parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"cannot create {str(target)!r}: {str(existing)!r} is not a folder")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {str(existing or target.parent)!r}")


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) of the file system that holds ``folder`` or its nearest ancestor."""
    for candidate in (folder, *folder.parents):
        try:
            return os.pathconf(candidate, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


# ----------------------------------------------------------------------------- the lock on the output


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.llmprune.lock"


@dataclass
class _Claim:
    descriptor: int | None  # the locked lock file; None where the file system has no flock
    created: list[Path] = field(default_factory=list)  # parent folders this claim made, outermost first


_CLAIMS: dict[Path, _Claim] = {}


def claim_output(path, overwrite: bool) -> Path:
    """Check the target again, create its missing parent folders and lock it for this run
    (refused at once, UsageError, when another run holds it). Call once every check of the run
    has passed; a target already claimed by this process is returned as it is. Released by
    ``release_output`` (llmprune.save's writer, the CLI's RunGuard, or at exit)."""
    target = _resolved(path)
    if target in _CLAIMS:
        return target
    marker, inputs = _CHECKED.get(target, (MODEL_MARKER, []))
    _refuse_related(target, inputs)
    _check_target_itself(target, overwrite, marker)
    created = _make_parents(target.parent)
    try:
        descriptor = _lock(lock_path(target))
    except BaseException:
        _remove_empty(created)
        raise
    if descriptor is False:
        _remove_empty(created)
        raise UsageError(f"output folder {str(target)!r} is being written by another llmprune run; "
                         f"wait for it to end or choose another --output")
    _CLAIMS[target] = _Claim(descriptor, created)
    return target


def is_claimed(path) -> bool:
    return _resolved(path) in _CLAIMS


def release_output(path) -> None:
    """Remove the lock file (while still holding it, see the module docstring), drop the lock,
    and remove the parent folders the claim created if nothing was written into them."""
    target = _resolved(path)
    claim = _CLAIMS.pop(target, None)
    if claim is None:
        return
    if claim.descriptor is not None:
        try:
            if _names(lock_path(target), claim.descriptor):
                os.unlink(lock_path(target))
        except OSError:
            pass
        os.close(claim.descriptor)
    if not os.path.lexists(target):
        _remove_empty(claim.created)


def release_all() -> None:
    for target in list(_CLAIMS):
        release_output(target)


atexit.register(release_all)


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)][::-1]
    created = []
    try:
        for path in missing:
            os.mkdir(path)
            created.append(path)
    except FileExistsError:
        pass
    except OSError as error:
        _remove_empty(created)
        raise UsageError(f"cannot create {str(folder)!r}: {error.strerror}") from None
    return created


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            break


def _names(path: Path, descriptor: int) -> bool:
    """Whether ``path`` still names the open file ``descriptor``."""
    try:
        here, there = os.stat(path, follow_symlinks=False), os.fstat(descriptor)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock(path: Path):
    """An exclusive flock on the lock file ``path``, created if needed: its descriptor; False when
    another process holds it; None when the file system cannot lock (logged)."""
    if fcntl is None:
        return None
    busy_since = None
    for _ in range(1000):
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise UsageError(f"cannot create the lock file {str(path)!r}: {error.strerror}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a run holds it (or is just letting it go: wait a moment)
            os.close(descriptor)
            busy_since = busy_since or time.monotonic()
            if time.monotonic() - busy_since > 0.25:
                return False
            time.sleep(0.01)
            continue
        except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system without flock
            os.close(descriptor)
            log.warning("cannot lock %s (%s): running without the lock", path, error.strerror)
            return None
        if _names(path, descriptor):
            return descriptor
        os.close(descriptor)  # its holder removed it after we opened it: lock the new file
    raise UsageError(f"cannot take the lock {str(path)!r}: it keeps being replaced")


# ----------------------------------------------------------------------------- locks on temporary folders


def lock_folder(folder: Path) -> int | None:
    """Hold an exclusive flock on ``folder`` itself (its descriptor, to close when the folder is
    gone or in place): it says "in use" to other runs for as long as this process lives, in any
    process namespace. None where the file system cannot lock folders."""
    if fcntl is None:
        return None
    return _try_flock(os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)))


def folder_unlocked(folder: Path) -> int | None:
    """If nobody holds ``folder``'s lock: a descriptor holding it now (close it after removing the
    folder); else None. Unknown (no flock, not a folder, a link) counts as held."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0)
                             | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    return _try_flock(descriptor)


def _try_flock(descriptor: int) -> int | None:
    """The descriptor, now holding an exclusive lock; None (descriptor closed) when another holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


# ----------------------------------------------------------------------------- SIGTERM


def _terminate(signum, frame):
    raise Terminated()


class RunGuard:
    """For one CLI call: SIGTERM raises Terminated (clean-up as for Ctrl-C), and the outputs
    claimed during the call are released when it closes. A no-op for signals outside the main
    thread, and where SIGTERM already has a handler of its own or is ignored."""

    def __init__(self):
        self._claims_before = set(_CLAIMS)
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                    self._previous = signal.signal(signal.SIGTERM, _terminate)
            except (ValueError, OSError):
                pass

    def close(self) -> None:
        for target in [t for t in _CLAIMS if t not in self._claims_before]:
            release_output(target)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
