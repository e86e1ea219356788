"""The recovery stage: distil the pruned model from the dense one (llmprune.recover), keeping its
shape and its exact zeros. Runs after the pruning stages of a run (``--recover-tokens N`` on a
prune run: the teacher is the run's input model, read again from disk), or on its own:

    python -m llmprune recover FOLDER --teacher MODEL --data SOURCE ... --tokens N --output DIR

where FOLDER is any llmprune output folder (unstructured, N:M, structured uniform or global,
layers removed). The subcommand's flags are the stage's options without the ``recover_`` prefix.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from ..errors import UsageError
from ..options import Option
from . import Stage, StageResult

PREFIX = "recover_"
PLOT_FILE = "recovery.png"


class Recover(Stage):
    kind = "recover"
    order = 25  # after structured and unstructured pruning, before the dynamic wrapper
    placements = ("memory",)
    options = (
        Option("recover_tokens", int, 100_000, "recovery: training tokens (rounded up to whole steps)", minimum=1),
        Option("recover_data", "str_list", ["default"], "recovery: training text sources (default: the offline "
               "corpus)"),
        Option("recover_teacher", str, None, "recovery: the teacher (default: the run's input model; for `recover "
               "FOLDER`: the model its llmprune.json names)", metavar="MODEL"),
        Option("recover_mode", str, "lora", "recovery: lora (masked adapters, merged) | full (masked updates)",
               choices=("lora", "full")),
        Option("recover_rank", int, 16, "recovery: LoRA rank", minimum=1),
        Option("recover_alpha", float, 32.0, "recovery: LoRA alpha (scale alpha/rank)", minimum=0, exclusive=True),
        Option("recover_dropout", float, 0.0, "recovery: LoRA dropout", minimum=0, maximum=1, exclusive_max=True),
        Option("recover_targets", "str_list", None, "recovery: LoRA target modules (default: every decoder linear)",
               metavar="NAME"),
        Option("recover_lr", float, None, "recovery: peak learning rate (default 2e-4 LoRA, 2e-5 full)", minimum=0,
               exclusive=True),
        Option("recover_warmup", float, 0.05, "recovery: warm-up fraction of the steps, then cosine decay",
               minimum=0, maximum=1, exclusive_max=True),
        Option("recover_seqlen", int, 256, "recovery: tokens per training window", minimum=2),
        Option("recover_batch", int, 4, "recovery: windows per micro-batch (per process)", minimum=1),
        Option("recover_accumulation", int, 1, "recovery: micro-batches per optimiser step", minimum=1),
        Option("recover_seed", int, 0, "recovery: seed (LoRA initialisation, data order, dropout)"),
        Option("recover_kl", float, 1.0, "recovery: weight of KL(teacher || student)", minimum=0),
        Option("recover_temperature", float, 1.0, "recovery: distillation temperature", minimum=0, exclusive=True),
        Option("recover_hidden", float, 0.0, "recovery: weight of the per-layer normalised hidden-state MSE "
               "(SquareHead)", minimum=0),
        Option("recover_lm", float, 0.0, "recovery: weight of the plain language-model loss", minimum=0),
        Option("recover_curve_every", int, 0, "recovery: held-out perplexity every K steps (default: 10 points)",
               minimum=0),
        Option("recover_curve_tokens", int, 8192, "recovery: held-out tokens per curve point (from the eval data)",
               minimum=2),
        Option("recover_gradient_checkpointing", bool, False, "recovery: recompute activations in the backward pass"),
        Option("recover_checkpoint_every", int, 50, "recovery: with --checkpoint-dir, commit every N steps", minimum=1),
        Option("recover_mixed_precision", str, "auto", "recovery: autocast: auto (bf16 on a GPU, else fp16; none on "
               "the CPU) | no | bf16 (GPU or CPU) | fp16 (GPU)", choices=("auto", "no", "bf16", "fp16")),
    )

    student_source: str | None = None  # the student's folder (the subcommand): its tokenizer and llmprune.json

    def check(self) -> None:
        from ..recover import Settings

        self.settings = Settings.from_values(self.values)
        s = self.settings
        if s.kl == 0 and s.hidden == 0 and s.lm == 0:
            raise UsageError("recovery needs a loss: --recover-kl, --recover-hidden and --recover-lm are all 0")
        if s.mode == "lora":
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise UsageError("--recover-mode lora needs peft: pip install 'llmprune[recover]' (or use "
                                 "--recover-mode full)")
        if s.mode == "full" and self.given & {"recover_rank", "recover_alpha", "recover_targets"}:
            raise UsageError("--recover-rank, --recover-alpha and --recover-targets apply to --recover-mode lora")

    def needs_data(self) -> bool:
        return False  # it reads its own training text

    def memory_method(self) -> str:
        return "none"

    def tag(self) -> str:
        return f"{self.settings.mode}-{self.settings.tokens}"

    def check_model(self, model) -> None:
        from ..recover import check_teacher, layer_pairs

        if self.settings.targets:
            names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is not model}
            missing = [t for t in self.settings.targets if t not in names]
            if missing:
                raise UsageError(f"--recover-targets: no module named {', '.join(missing)} in the model")
        if self.settings.teacher is None:  # the run's input model, as loaded: same tokenizer, layers
            return
        check_teacher(model.config, self.student_source, self.settings.teacher)
        if self.settings.hidden > 0:
            from transformers import AutoConfig

            from ..models.loading import resolve_model

            teacher_layers = AutoConfig.from_pretrained(resolve_model(self.settings.teacher)).num_hidden_layers
            if layer_pairs(model.config.num_hidden_layers, teacher_layers, self._removed_from_folder()) is None:
                raise UsageError(f"--recover-hidden: the student has {model.config.num_hidden_layers} layers, the "
                                 f"teacher {teacher_layers}, and no record of which were removed; use "
                                 "--recover-hidden 0")

    def leaves_zeros(self) -> bool:
        """A student folder stored sparse, or pruned unstructured or N:M, keeps its zeros (a run's own
        pruning stages answer for a student pruned in the same run)."""
        if self.student_source is None:
            return False
        from ..sparse_format import is_sparse_folder

        stages = (_folder_report(self.student_source) or {}).get("stages", [])
        return is_sparse_folder(self.student_source) or any(s.get("kind") == "unstructured" for s in stages)

    def _removed_from_folder(self) -> list | None:
        """The removed layer indices the student's llmprune.json records, if any."""
        if self.student_source is None:
            return None
        report = _folder_report(self.student_source) or {}
        for stage in report.get("stages", []):
            if stage.get("kind") == "structured":
                return stage["report"].get("removed_layers")
        return (report.get("structured") or {}).get("removed_layers")

    def estimate_memory(self, spec, prepared: dict, estimate):
        """Teacher + student + trainable state + activations, before anything is loaded; refused
        (unless --force) when it does not fit. Returns the larger of this and ``estimate``. The
        first hook that knows the compute device: a mixed precision it lacks is refused here too."""
        from ..recover import check_mixed_precision, estimate_recovery, refuse_recovery

        check_mixed_precision(self.settings.mixed_precision, prepared["compute"])
        ours = estimate_recovery(spec.model, self.settings.teacher or spec.model, self.settings, prepared)
        if ours is None:
            return estimate
        refuse_recovery(ours, spec.force)
        return ours if estimate is None or ours.host + ours.device > estimate.host + estimate.device else estimate

    def open_checkpoint(self, folder, run, identity: dict):
        from ..checkpoint import run_fingerprint
        from ..recover import RecoverCheckpoint

        fingerprint = {**identity, **run_fingerprint(run.model, None, 1), "settings": self.settings.as_dict(),
                       "teacher": self.settings.teacher or run.spec.model,
                       "processes": run.group.world if run.group else 1}
        return RecoverCheckpoint(folder, fingerprint)

    def apply(self, run, checkpoint=None) -> StageResult:
        from ..models.loading import load_model
        from ..recover import Work, decoder_zeros, layer_pairs, train, training_windows

        started = time.perf_counter()
        s = self.settings
        teacher_name = s.teacher or run.spec.model
        teacher, _ = load_model(teacher_name, dtype=run.dtype, trust_remote_code=run.trust_remote_code)
        pairs = None
        if s.hidden > 0:
            pairs = layer_pairs(run.model.config.num_hidden_layers, teacher.config.num_hidden_layers,
                                self._removed_layers(run))
            if pairs is None:
                raise UsageError("--recover-hidden: the student's layers do not correspond to the teacher's")
        world = run.group.world if run.group else 1
        windows = training_windows(run.tokenizer, s.data, s.tokens, s.seqlen, s.seed, s.batch * s.accumulation * world)
        evaluation = None
        if run.evaluation is not None:
            evaluation = run.evaluation[:max(s.curve_tokens, run.spec.eval_seqlen)]
        before = decoder_zeros(run.model)
        masks = _zero_positions(run.model)
        work = Work(run.model, teacher, windows, evaluation, run.spec.eval_seqlen, run.bos, run.compute,
                    run.progress, checkpoint, pairs)
        merged, report = train(work, s)
        run.model = merged
        after = decoder_zeros(merged)
        report.update({"teacher": teacher_name, "settings": s.as_dict(), "pairs": pairs,
                       "zeros_before": before, "zeros_after": after,
                       "zeros_unchanged": masks == _zero_positions(merged),
                       "student": _student_summary(self.student_source, run)})
        del teacher
        self.result_report = report
        title = f"recovery ({s.mode}) of {Path(str(self.student_source or run.spec.model)).name}"
        extra = (lambda folder: _plot(report, folder / PLOT_FILE, title)) if report["curve"] else None
        return StageResult(report, time.perf_counter() - started, extra_files=extra)

    def _removed_layers(self, run) -> list | None:
        for stage in run.spec.stages:  # a structured stage earlier in this run
            report = getattr(stage, "report", None)
            if stage.kind == "structured" and report is not None:
                return list(report.removed_layers)
        return self._removed_from_folder()

    def summary_rows(self, result: StageResult) -> list[tuple[str, str]]:
        r, s = result.report, self.settings
        curve = r["curve"]
        how = "".join([f", {r['processes']} processes" if r["processes"] > 1 else "",
                       f", {r['mixed_precision']} autocast" if r["mixed_precision"] != "no" else ""])
        rows = [("recovery", f"{s.mode} from {r['teacher']}, {r['tokens']:,} tokens, {r['steps']} steps{how}, "
                             f"{r['seconds']:.0f} s ({r['tokens_per_s']:.0f} tokens/s)")]
        if curve:
            rows.append(("held-out", f"perplexity {curve[0]['perplexity']:.2f} -> {curve[-1]['perplexity']:.2f} "
                                     f"during recovery (teacher {r['teacher_perplexity']:.2f}); curve in {PLOT_FILE}"))
        z = r["zeros_after"]
        rows.append(("zeros", f"{'unchanged' if r['zeros_unchanged'] else 'CHANGED'}: {z['zeros']:,} of "
                              f"{z['weights']:,} decoder weights ({z['sparsity']:.4f})"))
        return rows


def _zero_positions(model) -> list:
    """The positions of the zeros of every decoder linear weight (bool tensors), to compare."""
    from ..models.adapters import adapter_for

    adapter = adapter_for(model)
    return _Positions([(linear.weight == 0).cpu() for layer in adapter.layers(model)
                       for group in adapter.linear_groups(layer) for _, linear in group])


class _Positions(list):
    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(a.shape == b.shape and bool((a == b).all()) for a, b in zip(self, other))


def _plot(report: dict, path, title: str) -> None:
    from ..recover import plot_curve

    plot_curve(report, path, title)


def _folder_report(folder) -> dict | None:
    try:
        return json.loads((Path(folder) / "llmprune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _student_summary(folder, run) -> dict:
    """What the student was: its folder's pruning stages, or this run's."""
    if folder is None:
        return {"stages": [{"kind": s.kind, "method": s.method} for s in run.spec.stages if s.kind != "recover"]}
    report = _folder_report(folder) or {}
    return {"folder": str(folder), "model": report.get("model"),
            "stages": [{"kind": s.get("kind"), "method": s.get("method")} for s in report.get("stages", [])]}


def recovery_card_section(report: dict) -> str:
    """The model card's account of a recovery stage."""
    stage = next((s for s in report.get("stages", []) if s["kind"] == "recover"), None)
    if stage is None:
        return ""
    r = stage["report"]
    s = r["settings"]
    weights = ", ".join(f"{k} {s[k]:g}" for k in ("kl", "hidden", "lm") if s[k])
    lines = ["", "## Recovery", "",
             f"Distilled from `{r['teacher']}` on {r['tokens']:,} tokens of {s['data']} ({r['steps']} steps of "
             f"{s['batch']} x {s['accumulation']} x {r['processes']} windows of {s['seqlen']} tokens), loss: {weights} "
             f"(temperature {s['temperature']:g}); "
             + (f"LoRA rank {s['rank']}, alpha {s['alpha']:g}, merged" if s["mode"] == "lora" else "full fine-tuning")
             + f"; learning rate {s['lr']:g}, warm-up {s['warmup']:g}, cosine decay; seed {s['seed']}"
             + (f"; {r['mixed_precision']} autocast" if r.get("mixed_precision", "no") != "no" else "") + ".", "",
             f"Exact zeros {'kept' if r['zeros_unchanged'] else 'NOT kept'}: {r['zeros_after']['zeros']:,} of "
             f"{r['zeros_after']['weights']:,} decoder linear weights are zero, at the same positions as before "
             "(the LoRA delta is masked, W + M * BA; full fine-tuning masks the updates). Shapes and config "
             "are unchanged.", ""]
    if r["curve"]:
        lines += [f"Held-out perplexity during recovery (teacher: {r['teacher_perplexity']:.3f}; plot: "
                  f"`{PLOT_FILE}`):", "", "| training tokens | perplexity |", "|---:|---:|"]
        lines += [f"| {p['tokens']:,} | {p['perplexity']:.3f} |" for p in r["curve"]] + [""]
    return "\n".join(lines)


def recovery_card(base_model: str, report: dict) -> str:
    """The model card of a run whose only stage is recovery (``recover FOLDER``)."""
    import yaml

    stage = next(s for s in report["stages"] if s["kind"] == "recover")
    student = stage["report"]["student"]
    ppl = report.get("perplexity", {})
    summary = {"method": "recover", "teacher": stage["report"]["teacher"],
               "pruned_with": [s["method"] for s in student.get("stages", [])],
               "realised_sparsity": round(stage["report"]["zeros_after"]["sparsity"], 6)}
    if ppl:
        summary["perplexity"] = {("before" if k == "dense" else "after"): round(v["perplexity"], 4)
                                 for k, v in ppl.items()}
    from ..models.loading import base_model_id

    front = {"base_model": base_model_id(stage["report"]["teacher"]), "library_name": "transformers",
             "tags": ["llmprune", "pruned", "distilled"],
             "llmprune": summary}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(base_model).name}, recovered by distillation", "",
             f"Made by llmprune from `{base_model}` (pruned with {', '.join(summary['pruned_with']) or 'unknown'}), "
             f"distilled from `{stage['report']['teacher']}`.", ""]
    if ppl and len(ppl) == 2:
        before, after = (v["perplexity"] for v in ppl.values())
        lines += ["| | before | after |", "|---|---:|---:|", f"| perplexity | {before:.3f} | {after:.3f} |", "",
                  f"Evaluation data: {report.get('eval_data')}. Protocol: {ppl['dense']['protocol']}.", ""]
    lines += [recovery_card_section(report), f"Command: `{report.get('command', '')}`", "",
              "Per-step details and timings are in `llmprune.json`.", ""]
    return "\n".join(lines)


# --- python -m llmprune recover FOLDER ... --------------------------------------------------------------

RUN_FLAGS = ("eval_data", "eval_seqlen", "eval_tokens", "output", "overwrite", "device", "dtype", "no_cache",
             "checkpoint_dir", "force", "trust_remote_code", "no_progress", "push_to_hub", "private", "save_format")


def _subcommand_options() -> list:
    """The stage's options under the subcommand's names: --tokens for --recover-tokens, ..."""
    from dataclasses import replace

    return [replace(o, name=o.name[len(PREFIX):]) for o in Recover.options]


def recover_parser() -> argparse.ArgumentParser:
    from ..cli import Parser
    from ..job import RUN_OPTIONS
    from ..options import add_arguments

    p = Parser(prog="python -m llmprune recover",
               description="Distil a pruned llmprune output folder from its dense model, keeping its shape and its "
                           "exact zeros; writes an ordinary merged folder with the curve (llmprune.json, README.md, "
                           f"{PLOT_FILE}).")
    p.add_argument("folder", metavar="FOLDER", help="an llmprune output folder (the student)")
    add_arguments(p, _subcommand_options())
    add_arguments(p.add_argument_group("run"), [o for o in RUN_OPTIONS if o.name in RUN_FLAGS])
    return p


def run_recover_command(argv: list[str]) -> int:
    from ..job import RUN_OPTIONS, RunSpec, run
    from ..options import check_values

    given = vars(recover_parser().parse_args(argv))
    folder = given.pop("folder")
    if not (Path(folder).expanduser() / "config.json").is_file():
        raise UsageError(f"{folder!r} is not a model folder (no config.json)")
    own = _subcommand_options()
    values = {k: v for k, v in given.items() if k in {o.name for o in own}}
    for option in own:  # refused under the subcommand's own flag names (--rank, not --recover-rank)
        if option.name in values:
            option.check(values[option.name])
    values = {PREFIX + k: v for k, v in values.items()}
    if values.get("recover_teacher") is None:
        values["recover_teacher"] = (_folder_report(folder) or {}).get("model")
        if values["recover_teacher"] is None:
            raise UsageError(f"--teacher is needed: {folder!r} has no llmprune.json naming its model")
    stage = Recover.build("recover", values)
    stage.student_source = str(folder)
    run_given = {k: v for k, v in given.items() if k in RUN_FLAGS}
    spec_values = check_values(RUN_OPTIONS, {**run_given, "model": str(folder)})
    spec = RunSpec(spec_values, [stage], command="python -m llmprune recover " + shlex.join(argv))
    run(spec)
    return 0
