"""Resumable layer-by-layer runs (``--checkpoint-dir``).

After each finished decoder layer the runner commits, in this order:

1. ``layer-<i>.safetensors``: what the method made of layer i (pruned weights, or for the
   structured statistics pass, that layer's statistics);
2. ``inputs-<i+1>.safetensors``: the hidden states entering layer i+1, one tensor per
   calibration batch (what the propagation pass produced), when there is a next layer;
3. ``checkpoint.json`` with ``finished = i + 1`` and the sha256 of every committed file, written
   to a temporary file and renamed: this is the commit point, so a run killed anywhere resumes
   from the last layer whose three files exist.

On resume, ``checkpoint.json`` must be an object of the expected types and every file read must
have the digest it was committed with: a forged, truncated or corrupted checkpoint is refused as
damaged (one line saying how to start over), never read into a silently wrong model.

Everything else a layer needs (its positional and keyword arguments: position embeddings, masks)
is recomputed by the cheap capture pass. ``checkpoint.json`` also holds the fingerprint of the run
(model, calibration tokens, method and options): a different command is refused, never mixed in.
Only safetensors and JSON are written; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UsageError

META = "checkpoint.json"


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's values (moved to CPU, contiguous), with its dtype and shape."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def run_fingerprint(model, calibration: torch.Tensor | None, batch_size: int) -> dict:
    """What a resumed run must share besides the method's options: the model (its config and its
    input embedding's values), the calibration token ids, the batching and the dtype."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    embedding = model.get_input_embeddings().weight
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "embedding_sha256": tensor_digest(embedding), "dtype": str(embedding.dtype), "batch_size": batch_size,
            "calibration_sha256": tensor_digest(calibration) if calibration is not None else None}


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(16 * 2**20):
            digest.update(piece)
    return digest.hexdigest()


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write the tensors to ``path`` (via a temporary file and a rename); return the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    digest = file_digest(tmp)
    os.replace(tmp, path)
    return digest


class DamagedCheckpoint(UsageError):
    """A checkpoint folder whose files are not what llmprune committed (forged, cut, overwritten)."""

    def __init__(self, folder: Path, why: str):
        super().__init__(f"--checkpoint-dir {str(folder)!r} is damaged ({why}); delete that folder (or give "
                         f"another --checkpoint-dir) to start over")


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_meta(folder: Path) -> dict:
    """``checkpoint.json`` after checking its shape: {"fingerprint": object, "finished": integer >= 0,
    "files": {file name: sha256}}, with a digest for every layer file a finished count implies."""
    path = folder / META
    try:
        if path.stat().st_size > 2**24:
            raise DamagedCheckpoint(folder, f"{META} is larger than 16 MiB")
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise UsageError(f"--checkpoint-dir {str(folder)!r}: unreadable {META} ({error.strerror or error})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DamagedCheckpoint(folder, f"{META} is not JSON") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(folder, f"{META} does not hold a JSON object")
    if not isinstance(meta.get("fingerprint"), dict):
        raise DamagedCheckpoint(folder, f"{META} has no fingerprint object")
    finished, files = meta.get("finished"), meta.get("files", {} if meta.get("finished") == 0 else None)
    if type(finished) is not int or finished < 0:
        raise DamagedCheckpoint(folder, f"{META}: finished must be a non-negative integer, "
                                        f"got {json.dumps(finished)[:40]}")
    if not isinstance(files, dict) or not all(_is_digest(v) for v in files.values()):
        raise DamagedCheckpoint(folder, f"{META} has no files object of sha256 digests")
    lacking = [i for i in range(min(finished, 10**6)) if _layer_file(i) not in files]
    if lacking or finished > 10**6:
        raise DamagedCheckpoint(folder, f"{META} counts {finished} finished layers but records no "
                                        f"{_layer_file(lacking[0] if lacking else 10**6)}")
    return {"fingerprint": meta["fingerprint"], "finished": finished, "files": dict(files)}


def _layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def _inputs_file(index: int) -> str:
    return f"inputs-{index:05d}.safetensors"


class LayerCheckpoint:
    """A checkpoint folder for one run, identified by ``fingerprint`` (JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict):
        self.folder = Path(folder).expanduser()
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.finished = 0
        self.files: dict[str, str] = {}  # committed file name -> sha256

    def open(self) -> int:
        """Create the folder or validate an existing one; return the number of finished layers."""
        if (self.folder / META).exists():
            meta = read_meta(self.folder)
            old = meta["fingerprint"]
            if old != self.fingerprint:
                differing = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise UsageError(f"--checkpoint-dir {str(self.folder)!r} holds a different run (differs in: "
                                 f"{', '.join(differing)}); use another folder or delete it")
            self.finished, self.files = meta["finished"], meta["files"]
            return self.finished
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            raise UsageError(f"--checkpoint-dir {str(self.folder)!r} exists and is not an llmprune checkpoint")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create --checkpoint-dir {str(self.folder)!r}: {error.strerror}") from None
        self._commit()
        return 0

    def _commit(self) -> None:
        _write_json_atomically(self.folder / META, {"fingerprint": self.fingerprint, "finished": self.finished,
                                                    "files": self.files})

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], next_inputs: list[torch.Tensor] | None) -> None:
        """Commit layer ``index`` as finished (see the module docstring for the order)."""
        self.files[_layer_file(index)] = _save_atomically(tensors, self.folder / _layer_file(index))
        if next_inputs is not None:
            self.files[_inputs_file(index + 1)] = _save_atomically(
                {str(b): h for b, h in enumerate(next_inputs)}, self.folder / _inputs_file(index + 1))
        self.files.pop(_inputs_file(index), None)
        self.finished = index + 1
        self._commit()
        stale = self.folder / _inputs_file(index)
        if stale.exists():
            stale.unlink()

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        """A committed file's tensors, after checking its bytes are the ones committed."""
        path = self.folder / name
        if name not in self.files:
            raise DamagedCheckpoint(self.folder, f"{META} records no {name}")
        try:
            if file_digest(path) != self.files[name]:
                raise DamagedCheckpoint(self.folder, f"{name} is not the file that was committed (cut or changed)")
            return load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise DamagedCheckpoint(self.folder, f"cannot read {name}: {getattr(error, 'strerror', None) or error}") \
                from None

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return self._load(_layer_file(index))

    def load_inputs(self, index: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states entering layer ``index``, on the device and dtype of ``like``."""
        stored = self._load(_inputs_file(index))
        if sorted(stored) != sorted(str(b) for b in range(len(like))) or any(
                stored[str(b)].shape != h.shape for b, h in enumerate(like)):
            raise UsageError(f"--checkpoint-dir {str(self.folder)!r}: "
                             "stored inputs do not match the calibration batches")
        return [stored[str(b)].to(device=h.device, dtype=h.dtype) for b, h in enumerate(like)]


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Delete a finished run's checkpoint files (only the files this module writes), then the
    folder if that leaves it empty: called once the output folder is safely written."""
    folder = Path(folder).expanduser()
    if not (folder / META).exists():
        return
    for pattern in ("layer-*.safetensors", "inputs-*.safetensors", "*.tmp"):
        for path in folder.glob(pattern):
            path.unlink()
    (folder / META).unlink()
    try:
        folder.rmdir()
    except OSError:  # the user put something else there: leave it
        pass
