"""Atomic Hugging Face output folders: weights, tokenizer, model card, and the run report.

Everything is written to a hidden temporary folder beside the target and renamed into place at
the end, so the target is either absent or complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def check_output_folder(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse (before any work) a target that exists and is not empty, unless overwrite."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise UsageError(f"output {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(target)!r} is not empty; pass --overwrite to replace it")
    parent = target.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create {str(parent)!r}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write in {str(parent)!r}")
    return target


def save_folder(model, tokenizer, target: str | os.PathLike, report: dict, card: str,
                overwrite: bool = False) -> Path:
    """Write model + tokenizer + README.md + llmprune.json to ``target`` atomically."""
    target = check_output_folder(target, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model.config, "llmprune_layer_sizes", None):  # uneven layers: ship the modelling file
            shutil.copyfile(Path(__file__).parent / "models" / "modeling_llmprune.py", tmp / "modeling_llmprune.py")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / "llmprune.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        _make_ordinary(tmp)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
    ppl = report.get("perplexity", {})
    front = {
        "base_model": base_model,
        "library_name": "transformers",
        "tags": ["llmprune", "pruned", method],
        "llmprune": {
            "method": method,
            "pattern": report["prune"]["pattern"],
            "target_sparsity": report["prune"]["target_sparsity"],
            "realised_sparsity": round(report["prune"]["overall_sparsity"], 6),
        },
    }
    if ppl:
        front["llmprune"]["perplexity"] = {k: round(v["perplexity"], 4) for k, v in ppl.items()}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(base_model).name} pruned with {method} ({report['prune']['pattern']}, "
             f"{report['prune']['overall_sparsity']:.1%} of decoder linear weights removed)", "",
             f"Made by [llmprune](https://pypi.org/project/llmprune/) from `{base_model}`.", "",
             "Unstructured and N:M sparsity is stored dense, with zeros in the removed positions: no "
             "sparse checkpoint format is written, so the files are as large as the base model's and "
             "the speed on ordinary kernels is unchanged. The embeddings and LM head are not pruned.", ""]
    if ppl:
        lines += ["| model | perplexity |", "|---|---|"]
        lines += [f"| {k} | {v['perplexity']:.3f} |" for k, v in ppl.items()]
        first = next(iter(ppl.values()))
        lines += ["", f"Evaluation data: {report.get('eval_data')}. Protocol: {first['protocol']}.", ""]
    lines += [f"Calibration: {report['prune']['nsamples']} samples x {report['prune']['seqlen']} tokens "
              f"from {report.get('calib_data')}, seed {report.get('seed')}.", "",
              f"Command: `{report.get('command', '')}`", "",
              "Per-layer sparsity and timings are in `llmprune.json`.", ""]
    return "\n".join(lines)
