"""The structured stage: remove attention heads, FFN neurons and whole decoder layers for real
(llmprune.structured). Needs the whole model: memory or a device map, not --stream."""

from __future__ import annotations

import time

from ..errors import UsageError
from ..options import Option
from . import Stage, StageResult


def check_something_removed(values: dict) -> None:
    """The one rule beyond each option's own range: something must be removed."""
    if values["heads"] == values["ffn"] == 0 and values["layers"] == 0:
        raise UsageError("structured pruning needs --heads, --ffn or --layers")


class Structured(Stage):
    """Its options are the one declaration of structured pruning's settings: the flags, the recipe
    keys and the checks of the Python API ``llmprune.structured.prune_structured`` use them."""

    kind = "structured"
    order = 10
    measures_speed = True  # removal is what makes a model faster: show it (--no-speed skips it)
    options = (
        Option("heads", float, 0.0, "fraction of attention heads to remove", minimum=0, maximum=1,
               exclusive_max=True),
        Option("ffn", float, 0.0, "fraction of FFN neurons to remove", minimum=0, maximum=1,
               exclusive_max=True),
        Option("layers", int, 0, "number of whole decoder layers to remove", minimum=0),
        Option("score", str, "flap", "magnitude | wanda | flap (default flap: the only score with which "
               "removing heads keeps the model usable)", choices=("magnitude", "wanda", "flap")),
        Option("allocation", str, "uniform", "uniform (same count per layer, plain HF folder) | global "
               "(ranked across layers)", choices=("uniform", "global")),
        Option("gqa", str, "groups", "groups: remove whole KV groups | queries: remove query heads evenly per group",
               choices=("groups", "queries")),
        Option("round_to", int, 1, "keep FFN widths a multiple of N", minimum=1),
        Option("round_heads_to", int, 1, "keep query-head counts a multiple of N", minimum=1),
    )

    def check(self) -> None:
        check_something_removed(self.values)

    def check_model(self, model) -> None:
        from ..structured import check_structured

        check_structured(model.config, **self.values)

    def needs_data(self) -> bool:
        return self.values["score"] != "magnitude" or self.values["layers"] > 0

    def tag(self) -> str:
        v = self.values
        return f"h{round(float(v['heads']) * 100)}-f{round(float(v['ffn']) * 100)}-l{v['layers']}-{v['score']}"

    def open_checkpoint(self, folder, run, identity: dict):
        from ..structured import structured_checkpoint

        return structured_checkpoint(folder, run.model, run.calibration, dict(self.values), run.batch_size, identity)

    def apply(self, run, checkpoint=None) -> StageResult:
        from ..structured import prune_structured

        started = time.perf_counter()
        report = prune_structured(run.model, run.calibration, **self.values, device=run.compute,
                                  batch_size=run.batch_size, progress=run.progress, checkpoint=checkpoint)
        self.report = report
        return StageResult(report.as_dict(), time.perf_counter() - started, storage="dense safetensors")

    def summary_rows(self, result: StageResult) -> list[tuple[str, str]]:
        v, report = self.values, result.report
        sizes = report["layer_sizes"]
        return [("method", f"structured (heads {v['heads']:g}, ffn {v['ffn']:g}, layers {v['layers']}, score "
                           f"{v['score']}, {v['allocation']}, gqa {v['gqa']})"),
                ("removed", f"layers {report['removed_layers'] or 'none'}; layer sizes "
                            f"{'uniform ' + str(sizes[0]) if report['uniform'] else 'per layer (see llmprune.json)'}")]
