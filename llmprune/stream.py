"""Streaming: prune a model larger than memory, one decoder layer at a time (``--stream``).

The model is a skeleton whose parameters live on the meta device (no memory); its buffers (the
rotary tables) are real, since they are computed, not stored. Then:

1. the embedding rows of the tokens the calibration uses are read from the checkpoint's
   safetensors shards; the shared runner captures the layer-0 inputs of the calibration batches;
   the embeddings go back to meta;
2. for each decoder layer: its tensors are read from the shards (safetensors ``safe_open``, one
   tensor at a time), the runner calibrates and prunes it and propagates the activations, its
   pruned tensors are written to the output shards, and it goes back to meta;
3. every tensor outside the decoder layers (embeddings, final norm, LM head) is copied to the
   output as it is, one at a time.

Peak memory: about one layer read and one written plus the calibration activations
(nsamples x seqlen x hidden), whatever the depth; with ``activations_on_disk`` the activations
live in memory-mapped files instead. The output is an ordinary sharded Hugging Face checkpoint
with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import UsageError
from .memory import release_free_heap
from .models.validate import check_model_folder, checkpoint_tensors
from .save import SAFETENSORS_DTYPES, ShardWriter, StoredBytes


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file, or shards named by an index), by name.

    Each read opens its shard and closes it again: a safetensors file is memory-mapped while
    open, and the pages a read touched would otherwise stay in this process's resident memory
    until the end, adding up to the whole checkpoint."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").is_file():
            raise UsageError("--stream needs a safetensors checkpoint (model.safetensors or an index) "
                             f"in {str(folder)!r}")
        # Headers parsed and checked (offsets, sizes, shards) by llmprune.models.validate.
        self._stored = checkpoint_tensors(folder)

    def names(self) -> list[str]:
        return list(self._stored)

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._stored[name].file, framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(name)  # its own private mapping of the file: unmapped when freed
        return tensor.to(dtype)

    def stored(self, name: str) -> StoredBytes:
        """Where the tensor's bytes are, to copy them unchanged without loading them."""
        stored = self._stored[name]
        return StoredBytes(str(stored.file), stored.begin, stored.end - stored.begin, stored.dtype, list(stored.shape))

    def read_rows(self, name: str, rows: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` of a stored 2-D tensor [V, H], as [len(rows), H]: plain reads at their
        offsets, not a memory mapping, whose touched pages would count as this process's memory."""
        stored = self.stored(name)
        width = stored.shape[1]
        row_bytes = stored.size // stored.shape[0]
        stored_dtype = next(getattr(torch, k) for k, v in SAFETENSORS_DTYPES.items() if v == stored.dtype)
        buffer = bytearray(len(rows) * row_bytes)
        view = memoryview(buffer)
        with open(stored.path, "rb") as handle:
            for i, row in enumerate(rows):
                handle.seek(stored.start + row * row_bytes)
                if handle.readinto(view[i * row_bytes:(i + 1) * row_bytes]) != row_bytes:
                    raise UsageError(f"{stored.path}: truncated tensor {name}")
        return torch.frombuffer(buffer, dtype=stored_dtype).reshape(len(rows), width).to(dtype)

    def dtype_name(self, name: str) -> str:
        return self._stored[name].dtype


def skeleton(folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _set(module: nn.Module, name: str, value: torch.Tensor | None, device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value)


class StreamFromCheckpoint:
    """The runner's placement for streaming: ``enter`` reads a layer from the checkpoint onto
    the compute device, ``leave`` writes it to the output shards (main process only) and drops
    it to meta. The first ``enter`` also drops the embeddings: capture is over by then."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, writer: ShardWriter | None,
                 layers_prefix: str, device: torch.device, dtype: torch.dtype):
        self.model, self.reader, self.writer = model, reader, writer
        self.prefix, self.device, self.dtype = layers_prefix, device, dtype

    def _names(self, index: int, layer: nn.Module) -> list[str]:
        return [name for name, _ in layer.named_parameters()] + [
            name for name, _ in layer.named_buffers() if f"{self.prefix}.{index}.{name}" in self.reader]

    def enter(self, index: int, layer: nn.Module) -> None:
        if index == 0:
            release_outside_layers(self.model, self.prefix)
        for name in self._names(index, layer):
            _set(layer, name, self.reader.read(f"{self.prefix}.{index}.{name}", self.dtype), self.device)

    def writable(self, layer: nn.Module):
        return nullcontext(layer)

    def leave(self, index: int, layer: nn.Module) -> None:
        for name in self._names(index, layer):
            if self.writer is not None:
                owner, _, attribute = name.rpartition(".")
                self.writer.add(f"{self.prefix}.{index}.{name}", getattr(layer.get_submodule(owner), attribute))
            _set(layer, name, None, "meta")
        if self.writer is not None:
            self.writer.flush()  # this layer is on disk: its memory can go
        release_free_heap()


def layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("the decoder layers are not a submodule of the model")


def load_embedding_rows(model: nn.Module, reader: CheckpointReader, calibration: torch.Tensor, device,
                        dtype) -> torch.Tensor:
    """Read only the input-embedding rows the calibration uses (all the capture pass needs) and
    return the calibration ids [nsamples, seqlen] renumbered into them: SmolLM2's embeddings are
    a fifth of the model, a calibration set touches a few thousand of its 49152 rows."""
    embedding = model.get_input_embeddings()
    name = next(n for n, module in model.named_modules() if module is embedding)  # e.g. model.embed_tokens
    rows, renumbered = torch.unique(calibration, sorted=True, return_inverse=True)  # [U], [nsamples, seqlen]
    # A [U, hidden] weight in place of the [V, hidden] one (accelerate's setter would refuse the
    # shape); it goes back to meta after capture and the skeleton itself is never saved.
    embedding.weight = nn.Parameter(reader.read_rows(f"{name}.weight", rows.tolist(), dtype).to(device),
                                    requires_grad=False)
    # padding_idx only matters to gradients, and may lie past the U rows, which F.embedding refuses.
    embedding.padding_idx = None
    return renumbered


def release_outside_layers(model: nn.Module, prefix: str) -> None:
    """Drop every real parameter outside the decoder layers back to the meta device."""
    for name, parameter in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(prefix + ".") and not parameter.is_meta:
            _set(model, name, None, "meta")


def copy_outside_layers(reader: CheckpointReader, writer: ShardWriter, prefix: str, dtype: torch.dtype) -> None:
    """Every checkpoint tensor outside the decoder layers, to the output unchanged (one at a time)."""
    for name in reader.names():
        if not name.startswith(prefix + "."):
            same = reader.dtype_name(name) == SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")]
            writer.add(name, reader.stored(name) if same else reader.read(name, dtype))
            writer.flush()


def prune_streaming(folder: str | Path, output_folder: Path | None, calibration: torch.Tensor | None, *,
                    device: torch.device, dtype: torch.dtype, batch_size: int = 1, progress: bool = True,
                    max_shard_bytes: int = 2**30, activations_on_disk: str | Path | None = None,
                    trust_remote_code: bool = False, **prune_options):
    """Prune the checkpoint in ``folder`` layer by layer into shards written to ``output_folder``
    (the temporary folder of an atomic save; None on processes other than the main one).
    prune_options: what ``llmprune.prune`` takes about the pruning (method, sparsity, pattern,
    schedule, the method's options). Returns (PruneReport, config of the output)."""
    from .api import check_calibration, prune
    from .models.adapters import adapter_for

    check_model_folder(folder, strict=True)  # the names read below are the model's own: all must be there
    model = skeleton(folder, dtype, trust_remote_code)
    adapter = adapter_for(model)
    prefix = layers_prefix(model, adapter.layers(model))
    reader = CheckpointReader(folder)
    writer = ShardWriter(output_folder, max_shard_bytes) if output_folder is not None else None
    if writer is not None:
        copy_outside_layers(reader, writer, prefix, dtype)
    if calibration is not None:
        # against the real vocabulary
        check_calibration(model, calibration, f"method {prune_options.get('method', 'wanda')}")
        calibration = load_embedding_rows(model, reader, calibration, device, dtype)
    placement = StreamFromCheckpoint(model, reader, writer, prefix, device, dtype)
    placement.activation_folder = activations_on_disk
    report = prune(model, calibration, device=device, batch_size=batch_size, progress=progress,
                   placement=placement, **prune_options)
    release_outside_layers(model, prefix)
    if writer is not None:
        writer.finish()
        model.config.dtype = dtype
        model.config.save_pretrained(output_folder)
        if (Path(folder) / "generation_config.json").is_file():
            shutil.copyfile(Path(folder) / "generation_config.json", output_folder / "generation_config.json")
    distributed.barrier()
    return report, model.config
