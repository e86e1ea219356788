"""Resumable layer-by-layer runs (``--checkpoint-dir``).

After each finished decoder layer the runner commits, in this order:

1. ``layer-<i>.safetensors``: what the method made of layer i (pruned weights, or for the
   structured statistics pass, that layer's statistics);
2. ``inputs-<i+1>.safetensors``: the hidden states entering layer i+1, one tensor per
   calibration batch (what the propagation pass produced), when there is a next layer;
3. ``checkpoint.json`` with ``finished = i + 1``, written to a temporary file and renamed: this is
   the commit point, so a run killed anywhere resumes from the last layer whose three files exist.

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


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class LayerCheckpoint:
    """A checkpoint folder for one run, identified by ``fingerprint`` (JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict):
        self.folder = Path(folder).expanduser()
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.finished = 0

    def open(self) -> int:
        """Create the folder or validate an existing one; return the number of finished layers."""
        meta_path = self.folder / META
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise UsageError(f"--checkpoint-dir {str(self.folder)!r}: unreadable {META} ({error})") from None
            old = meta.get("fingerprint", {})
            if old != self.fingerprint:
                differing = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise UsageError(f"--checkpoint-dir {str(self.folder)!r} holds a different run (differs in: "
                                 f"{', '.join(differing)}); use another folder or delete it")
            self.finished = int(meta.get("finished", 0))
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
        _write_json_atomically(self.folder / META, {"fingerprint": self.fingerprint, "finished": self.finished})

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], next_inputs: list[torch.Tensor] | None) -> None:
        """Commit layer ``index`` as finished (see the module docstring for the order)."""
        _save_atomically(tensors, self.folder / f"layer-{index:05d}.safetensors")
        if next_inputs is not None:
            _save_atomically({str(b): h for b, h in enumerate(next_inputs)},
                             self.folder / f"inputs-{index + 1:05d}.safetensors")
        self.finished = index + 1
        self._commit()
        stale = self.folder / f"inputs-{index:05d}.safetensors"
        if stale.exists():
            stale.unlink()

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"layer-{index:05d}.safetensors"))

    def load_inputs(self, index: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states entering layer ``index``, on the device and dtype of ``like``."""
        stored = load_file(str(self.folder / f"inputs-{index:05d}.safetensors"))
        if len(stored) != len(like):
            raise UsageError(f"--checkpoint-dir {str(self.folder)!r}: stored inputs do not match the calibration batches")
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
