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
        title = f"{report['prune']['pattern']}, {report['prune']['overall_sparsity']:.1%} of decoder linear weights removed"
        storage = ("Unstructured and N:M sparsity is stored dense, with zeros in the removed positions: no "
                   "sparse checkpoint format is written, so the files are as large as the base model's and "
                   "the speed on ordinary kernels is unchanged.")
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
