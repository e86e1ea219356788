"""The unstructured stage: a method from llmprune.methods (magnitude, wanda, sparsegpt, ...) at a
sparsity or an N:M pattern, with a per-layer schedule. The only stage that can ``--stream``."""

from __future__ import annotations

import time

from ..errors import UsageError
from ..methods import METHODS, NMPattern, method_options, parse_pattern
from ..methods.masks import check_sparsity
from ..options import Option
from . import Stage, StageResult


class Unstructured(Stage):
    kind = "unstructured"
    order = 20
    placements = ("memory", "offload", "stream")
    options = (
        Option("sparsity", "number", None, "fraction of each decoder linear layer removed, 0 <= s < 1 "
               "(default 0.5; N/M with --pattern)"),
        Option("pattern", str, "unstructured", "unstructured (default), N:M (e.g. 2:4, 4:8), or block:B (whole B x B "
               "blocks at --sparsity, e.g. block:32, for block-sparse kernels)"),
        Option("schedule", "schedule", "uniform", "per-layer sparsity: uniform (default) | owl (outlier-weighted, "
               "OWL paper) | a comma-separated list with one sparsity per decoder layer"),
        Option("owl_m", float, 5.0, "owl: outlier threshold M x mean score (default 5)"),
        Option("owl_lambda", float, 0.08, "owl: layer sparsities range over target +- lambda (default 0.08)"),
        Option("update", str, "none", "refit the weights on the chosen masks, for any method: none (default) | obs "
               "(SparseGPT's column-by-column update) | admm (least squares on the support, as ALPS)",
               choices=("none", "obs", "admm")),
        Option("sequential", bool, False, "prune q/k/v, then o, then gate/up, then down, each from inputs that "
               "went through the pruned groups before it (true-sequential)"),
    )

    @classmethod
    def methods(cls) -> tuple:
        return tuple(METHODS)

    def leaves_zeros(self) -> bool:
        return True

    @classmethod
    def all_options(cls) -> tuple:
        seen, extra = {o.name for o in cls.options}, []
        for name in METHODS:
            for option in method_options(name):
                if option.name not in seen:
                    seen.add(option.name)
                    extra.append(option)
        return cls.options + tuple(extra)

    def check(self) -> None:
        from ..schedules import check_owl_options, parse_schedule

        self.nm = parse_pattern(self.values["pattern"])
        sparsity = self.values["sparsity"]
        explicit = sparsity is not None
        fixed = isinstance(self.nm, NMPattern)  # N:M fixes the sparsity; blocks take --sparsity
        self.target = check_sparsity(sparsity if explicit else (self.nm.sparsity if fixed else 0.5), self.nm,
                                      explicit)
        self.schedule = parse_schedule(self.values["schedule"])
        if self.schedule != "uniform":
            if fixed:
                raise UsageError("--schedule applies to unstructured sparsity (not to --method structured or "
                                 "N:M patterns)")
            if self.schedule == "owl":
                check_owl_options(self.values["owl_m"], self.values["owl_lambda"])
            if isinstance(self.schedule, list) and not explicit:
                self.target = sum(self.schedule) / len(self.schedule)
        names = {o.name for o in method_options(self.method)}
        foreign = sorted(k for k in self.given if k in {o.name for o in self.all_options()} - names
                         and k not in {o.name for o in self.options})
        if foreign and self.strict:
            raise UsageError(f"{', '.join(foreign)}: not options of method {self.method}")

    strict = False  # recipes refuse another method's options; the command line ignores them

    def method_values(self) -> dict:
        return {o.name: self.values[o.name] for o in method_options(self.method)}

    def needs_data(self) -> bool:
        return METHODS[self.method].needs_calibration or self.schedule == "owl" or self.values["update"] != "none"

    def memory_method(self) -> str:
        return "hessian" if self.values["update"] != "none" else self.method

    def refit_values(self) -> dict:
        return {"update": self.values["update"], "sequential": self.values["sequential"]}

    def check_model(self, model) -> None:
        from ..api import check_pattern_fits

        check_pattern_fits(model, self.nm)

    def tag(self) -> str:
        percent = f"{round(self.target * 100):d}"
        tag = (str(self.nm).replace(":", "of") if isinstance(self.nm, NMPattern) else
               f"block{self.nm.size}-{percent}" if self.nm else percent)
        return tag + ("-owl" if self.schedule == "owl" else "-schedule" if isinstance(self.schedule, list) else "")

    def identity(self) -> dict:
        """What a resumed run must share beyond the method, target and pattern."""
        from ..api import refit_identity

        refit = refit_identity(**self.refit_values())
        if self.schedule == "uniform":
            return refit
        return {**refit, "schedule": {"schedule": self.schedule, "owl_m": self.values["owl_m"],
                                      "owl_lambda": self.values["owl_lambda"]}}

    def open_checkpoint(self, folder, run, identity: dict):
        from ..api import prune_checkpoint

        return prune_checkpoint(folder, run.model, run.calibration, self.method, self.target, self.nm, run.batch_size,
                                {**identity, **self.identity()}, **self.method_values())

    def apply(self, run, checkpoint=None) -> StageResult:
        from ..api import prune

        started = time.perf_counter()
        report = prune(run.model, run.calibration if self.needs_data() else None, method=self.method,
                       sparsity=self.target, pattern=self.nm, device=run.compute, batch_size=run.batch_size,
                       progress=run.progress, checkpoint=checkpoint, schedule=self.schedule,
                       owl_m=self.values["owl_m"], owl_lambda=self.values["owl_lambda"],
                       outlier_ratios=run.outlier_ratios, **self.refit_values(), **self.method_values())
        return StageResult(report.as_dict(), time.perf_counter() - started,
                           storage="dense safetensors with zeros (no sparse format)")

    def stream(self, source, folder, calibration, run):
        """Prune the checkpoint in ``source`` layer by layer into ``folder`` (llmprune.stream)."""
        from ..models.loading import DTYPES
        from ..stream import prune_streaming

        return prune_streaming(source, folder, calibration, method=self.method, sparsity=self.target, pattern=self.nm,
                               device=run.compute, dtype=DTYPES[run.dtype], batch_size=run.batch_size,
                               progress=run.progress, activations_on_disk=run.activations_on_disk,
                               trust_remote_code=run.trust_remote_code, schedule=self.schedule,
                               **self.refit_values(), **self.method_values())

    def summary_rows(self, result: StageResult) -> list[tuple[str, str]]:
        report = result.report
        removed = f"{report['overall_sparsity']:.4f} of decoder linear weights"
        if report["schedule"]["name"] != "uniform":
            removed += " (per layer " + ", ".join(f"{x:.3f}" for x in report["per_layer_sparsity"]) + ")"
        refit = "".join([f", update {self.values['update']}" if self.values["update"] != "none" else "",
                         ", sequential" if self.values["sequential"] else ""])
        return [("method", f"{self.method} ({report['pattern']}, target {self.target:g}, schedule "
                           f"{report['schedule']['name']}{refit})"), ("realised sparsity", removed)]

