"""Checks on a model folder before transformers reads it, so that a damaged or inconsistent
input model is refused with one line instead of a traceback or, worse, a silently wrong model.

- every safetensors file is parsed here first (the 8-byte header length, the JSON header, each
  tensor's dtype, shape and data offsets against each other and against the file size), also for
  sharded folders with ``model.safetensors.index.json``; a folder with only pickle weights
  (``pytorch_model.bin``) is refused, since unpickling can run code;
- the values in ``config.json`` are checked in one function (``check_config_values``);
- the model the config describes is built on the meta device (no memory) and its tensor names
  and shapes are compared with the checkpoint's: a config that declares more layers than the
  weights hold, a wrong ``hidden_size`` and the like are refused naming the first keys, before
  transformers would initialise the missing weights at random;
- after loading, transformers' own loading report is checked again (``check_loading_info``),
  which also covers Hub models and families whose checkpoint keys are renamed while loading.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type

from ..errors import UsageError

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
MAX_JSON_BYTES = 100 * 2**20  # config.json, the shard index
INDEX = "model.safetensors.index.json"
# safetensors dtype -> bits per element (sub-byte types pack several elements per byte)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8,
              "F8_E8M0": 8, "F16": 16, "BF16": 16, "I16": 16, "U16": 16, "F32": 32, "I32": 32, "U32": 32,
              "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt", "model.pth",
                  "model.ckpt", "consolidated.00.pth")
# Size fields of a decoder config: each must be a positive integer when given.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
# Where transformers looks for a composite model's text part (PreTrainedConfig.get_text_config).
TEXT_PARTS = ("text_config", "decoder", "generator", "text_encoder")
# What loading may raise on bad input: reported as one line. MemoryError and CUDA's out-of-memory
# are not input errors and are left alone.
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError, RuntimeError,
               AssertionError, NotImplementedError, RecursionError, StrictDataclassError)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_load_error(error: BaseException) -> bool:
    return isinstance(error, LOAD_ERRORS) and not isinstance(error, (MemoryError, torch.OutOfMemoryError))


# ----------------------------------------------------------------------------- safetensors files


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: ``file``, bytes [begin, end) of it (absolute positions)."""
    file: Path
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, {name: StoredTensor}, after checking
    that the file is whole and consistent: header length within the file, a JSON object, each
    entry's dtype known, shape non-negative integers, byte size = elements x dtype size, and the
    tensors covering the data area exactly, without overlap. Raises UsageError naming the file."""
    path = Path(path)

    def damaged(why: str) -> UsageError:
        return UsageError(f"{path} is not a valid safetensors file: {why}")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise damaged(f"{size} bytes, shorter than the 8-byte header length (cut short?)")
            length = int.from_bytes(prefix, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise damaged(f"header length {length} is larger than the file ({size} bytes) or 100 MiB "
                              f"(cut short or overwritten?)")
            raw = handle.read(length)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise damaged("its header is not JSON (overwritten?)") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged("__metadata__ is not a mapping of strings")
    spans = []
    for name, entry in header.items():
        spans.append((*_tensor_span(name, entry, damaged), name))
    data_bytes = size - 8 - length
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise damaged(f"tensor {name!r} starts at byte {begin} of the data, expected {end} "
                          f"({'overlapping' if begin < end else 'a gap'})")
        end = stop
    if end != data_bytes:
        raise damaged(f"the tensors end at byte {end} of the data but the file holds {data_bytes} "
                      f"({'cut short' if end > data_bytes else 'trailing bytes'})")
    start = 8 + length
    return {name: StoredTensor(path, e["dtype"], tuple(e["shape"]), start + e["data_offsets"][0],
                               start + e["data_offsets"][1]) for name, e in header.items()}


def _tensor_span(name: str, entry, damaged) -> tuple[int, int]:
    """(begin, end) of one header entry after checking its dtype, shape and offsets agree."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise damaged(f"tensor {name!r} is not described by exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise damaged(f"tensor {name!r} has an unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise damaged(f"tensor {name!r} has a shape that is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise damaged(f"tensor {name!r} has data_offsets that are not two increasing non-negative integers")
    elements = 1
    for d in shape:
        elements *= d
    if elements * DTYPE_BITS[dtype] != (offsets[1] - offsets[0]) * 8:
        raise damaged(f"tensor {name!r}: {dtype} x {shape} does not take the {offsets[1] - offsets[0]} bytes "
                      f"its data_offsets give")
    return offsets[0], offsets[1]


def read_json_object(path: Path, what: str) -> dict:
    """A small JSON file that must hold an object; UsageError naming ``what`` otherwise."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UsageError(f"{what} {path} is larger than 100 MiB")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} is missing") from None
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UsageError(f"{what} {path} is not valid JSON ({one_line(error, 120)})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object (it holds a {type(value).__name__})")
    return value


def checkpoint_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors checkpoint, {name: StoredTensor}: one
    ``model.safetensors``, or the shards a ``model.safetensors.index.json`` names (each checked;
    every name in the index must be in the shard it names, and no name in two shards)."""
    if (folder / INDEX).is_file():
        index = read_json_object(folder / INDEX, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UsageError(f"shard index {folder / INDEX} has no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        for file in files:
            if file in ("", ".", "..") or "/" in file or "\\" in file:
                raise UsageError(f"shard index {folder / INDEX} names {file[:80]!r}, not a file in the folder")
            if not (folder / file).is_file():
                raise UsageError(f"shard {folder / file} named by {INDEX} is missing")
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
        if pickles:
            raise UsageError(f"model folder {str(folder)!r} holds only pickle weights ({pickles[0]}); pickle "
                             f"checkpoints are not loaded (unpickling can run code): convert them to safetensors")
        raise UsageError(f"model folder {str(folder)!r} has no model.safetensors (nor {INDEX})")
    tensors = {}
    for file in files:
        for name, stored in read_safetensors_header(folder / file).items():
            if name in tensors:
                raise UsageError(f"tensor {name!r} is stored twice, in {tensors[name].file.name} and {file}")
            tensors[name] = stored
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file.name != file:
                raise UsageError(f"shard index {folder / INDEX} places {name!r} in {file}, which does not hold it")
    return tensors


# ----------------------------------------------------------------------------- config.json


def check_config_values(config: dict, tensors: dict | None = None, where: str = "config.json") -> None:
    """Refuse config.json values no model can have: ``model_type`` not a string, a size field that
    is not a positive integer (or larger than anything the weights could hold), heads that do not
    divide, a composite model's text part inside a single-model config, a malformed
    ``quantization_config``. ``tensors`` (from checkpoint_tensors) bounds the sizes when known;
    ``where`` names the file in messages."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{where} has no model_type string")
    for field in SIZE_FIELDS:
        value = config.get(field)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise UsageError(f"{where}: {field} must be a positive integer, got {_short(value)}")
    if tensors is not None:
        if not tensors:
            raise UsageError("the checkpoint holds no tensors")
        largest = max((d for stored in tensors.values() for d in stored.shape), default=0)
        for field in SIZE_FIELDS[:-1]:  # max_position_embeddings is stored in no tensor
            value = config.get(field)
            bound = len(tensors) if field == "num_hidden_layers" else largest
            if value is not None and value > bound:
                raise UsageError(f"{where}: {field} = {value} does not fit the weights (at most {bound})")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise UsageError(f"{where}: num_key_value_heads ({kv_heads}) does not divide "
                         f"num_attention_heads ({heads})")
    hidden = config.get("hidden_size")
    if heads and hidden and config.get("head_dim") is None and hidden % heads:
        raise UsageError(f"{where}: num_attention_heads ({heads}) does not divide hidden_size ({hidden}) "
                         f"and no head_dim is given")
    for field in ("dtype", "torch_dtype"):
        value = config.get(field)
        if value is not None and not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)
                                      and getattr(torch, value).is_floating_point):
            raise UsageError(f"{where}: {field} must name a floating-point dtype such as \"float32\", "
                             f"got {_short(value)}")
    quantization = config.get("quantization_config")
    if quantization is not None and not (isinstance(quantization, dict)
                                         and isinstance(quantization.get("quant_method"), str)):
        raise UsageError(f"{where}: quantization_config is not a mapping with a quant_method")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def config_object(folder: Path, config: dict):
    """The transformers config for ``config`` (a family transformers or llmprune knows), or None
    for a model type only the folder's own code defines. Refuses text parts a family lacks and
    whatever the family's own validation rejects, as one line."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .registration import register_all

    register_all()
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        return None
    config_class = CONFIG_MAPPING[model_type]
    own_parts = set(getattr(config_class, "sub_configs", None) or {}) | set(
        getattr(config_class, "sub_configs_defaults", None) or {})
    for part in TEXT_PARTS:
        if part in config and part not in own_parts:
            raise UsageError(f"{folder / 'config.json'}: a {model_type!r} model has no {part!r} part "
                             f"(is this a composite model's config?); remove it")
    try:
        return config_class.from_dict(dict(config))
    except Exception as error:  # the family's own checks of its values: input errors
        if not is_load_error(error):
            raise
        raise UsageError(f"config.json in {str(folder)!r} is not a valid {model_type!r} config: "
                         f"{one_line(error, 200)}") from None


# ----------------------------------------------------------------------------- names and shapes


def expected_tensors(config, where: str = "config.json") -> tuple[dict, set[str], set[str], list[re.Pattern]]:
    """What a checkpoint for ``config`` must hold, from the model built on the meta device:
    ({name: shape} of its state dict, names that may be absent because they are tied to another
    tensor, names of computed buffers older checkpoints sometimes stored, ignore patterns)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=True):
            model = causal_lm_class(config)(config)
    except Exception as error:  # the family's code rejecting the config's values
        if not is_load_error(error):
            raise
        raise UsageError(f"{where}: no {config.model_type!r} model can be built from it: "
                         f"{one_line(error, 200)}") from None
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    computed = {name for module in model.modules() for name in getattr(module, "_non_persistent_buffers_set", ())}
    ignore = [re.compile(p) for p in (set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
                                      | set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()))]
    return shapes, tied, computed, ignore


def compare_with_config(folder: Path, config, tensors: dict) -> None:
    """Refuse a checkpoint whose tensor names or shapes differ from what ``config`` describes."""
    shapes, tied, computed, ignore = expected_tensors(config, str(folder / "config.json"))
    stored = {name: t.shape for name, t in tensors.items()}
    prefix = getattr(type(config), "base_model_prefix", None) or "model"
    if not any(n.startswith(prefix + ".") for n in stored) and any(n.startswith(prefix + ".") for n in shapes):
        stored = {f"{prefix}.{n}": s for n, s in stored.items()}  # saved from the base model: no prefix

    def ignored(name: str) -> bool:
        return any(p.search(name) for p in ignore)

    missing = [n for n in shapes if n not in stored and n not in tied and not ignored(n)]
    unexpected = [n for n in stored if n not in shapes and n.rsplit(".", 1)[-1] not in computed and not ignored(n)]
    mismatched = [n for n in shapes if n in stored and stored[n] != shapes[n]]
    refuse_incomplete(str(folder), missing, unexpected, [(n, stored[n], shapes[n]) for n in mismatched])


def refuse_incomplete(name: str, missing, unexpected, mismatched) -> None:
    """UsageError naming the first missing, unexpected or mismatched weights, if there are any."""
    def first(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if mismatched:
        key, stored, wanted = min(mismatched)
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UsageError(f"model {name!r}: weight {key} has shape {list(stored)} but config.json describes "
                         f"{list(wanted)}{more}; the config does not belong to these weights")
    if missing:
        raise UsageError(f"model {name!r}: config.json describes weights the checkpoint lacks: {first(missing)}; "
                         f"they would be random (config.json with more layers than the weights?)")
    if unexpected:
        raise UsageError(f"model {name!r}: the checkpoint holds weights config.json does not describe: "
                         f"{first(unexpected)} (config.json with fewer layers than the weights?)")


def check_loading_info(name: str, info: dict, model) -> None:
    """transformers' loading report (``output_loading_info=True``): any missing, unexpected or
    mismatched weight is refused; a tied weight or a stored copy of a computed buffer is not one."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    computed = {n for module in model.modules() for n in getattr(module, "_non_persistent_buffers_set", ())}
    missing = [k for k in info.get("missing_keys") or () if k not in tied]
    unexpected = [k for k in info.get("unexpected_keys") or () if k.rsplit(".", 1)[-1] not in computed]
    mismatched = [(k, s, w) for k, s, w in info.get("mismatched_keys") or ()]
    refuse_incomplete(name, missing, unexpected, mismatched)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_load_report():
    """Drop transformers' multi-line LOAD REPORT (its findings are reported in one line instead).
    A filter, not a raised level: transformers runs extra checks when that logger's level is set."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ----------------------------------------------------------------------------- the whole folder

_checked: dict = {}


def check_model_folder(folder: str | os.PathLike, *, strict: bool = False) -> None:
    """All checks on a local model folder before anything loads it (remembered per folder state,
    so that the memory estimate, the loader and the streamer share one check).

    ``strict`` (streaming, which reads the checkpoint by the model's own names): refuse quantised
    checkpoints, and compare names even for families whose keys transformers renames."""
    folder = Path(folder).expanduser()
    key = (str(folder.resolve()), strict, _folder_state(folder))
    if key in _checked:
        return
    config = read_json_object(folder / "config.json", "config.json")
    tensors = checkpoint_tensors(folder)
    check_config_values(config, tensors, str(folder / "config.json"))
    quantised = config.get("quantization_config") is not None
    if strict and quantised:
        raise UsageError(f"model folder {str(folder)!r} is quantised "
                         f"({config['quantization_config']['quant_method']}); --stream reads floating-point weights")
    config_obj = config_object(folder, config)
    known = config_obj is not None and causal_lm_class(config_obj) is not None
    if known and not quantised and (strict or not _renames_keys(config_obj)):
        compare_with_config(folder, config_obj, tensors)
    _checked[key] = True


def causal_lm_class(config):
    """The causal-LM class transformers (or llmprune's registration) has for this config, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def _renames_keys(config) -> bool:
    """Whether transformers converts this family's checkpoint names while loading (then only its
    own loading report can say what is missing)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_class = causal_lm_class(config)
    return bool(get_checkpoint_conversion_mapping(model_class.__name__)
                or get_checkpoint_conversion_mapping(config.model_type))


def _folder_state(folder: Path) -> tuple:
    """(name, size, mtime) of the files the checks read."""
    state = []
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        try:
            stat = path.stat()
        except OSError:
            continue
        state.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(state)
