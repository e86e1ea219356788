"""lm-evaluation-harness tasks run in process on an already loaded model (optional: needs ``lm_eval``).

lm_eval's ``HFLM`` wraps the model and tokenizer we loaded (no second load); tasks come from
lm_eval's registry, plus any task YAML under ``include_path`` (local tasks run offline).

Everything that can fail without the model is checked first, by ``prepare_tasks``: the task names,
and that every task's data can be had (from the Hub, or, when the Hub cannot be reached, from the
local datasets cache, asked in offline mode so that it fails in milliseconds rather than after
huggingface_hub's retries). Task YAML under ``include_path`` may run Python from that folder
(``!function`` entries, custom ``process_docs``), so it is read only with ``--trust-remote-code``.
"""

from __future__ import annotations

import logging
import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import UsageError

INSTALL_HINT = "pip install lm_eval (or: pip install 'llmprune[eval]')"


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401  (availability probe)
    except ImportError:
        return False
    return True


def check_include_path(include_path: str | None, trust_remote_code: bool) -> None:
    """Refuse ``--include-path`` without ``--trust-remote-code`` (its task YAML can run Python from
    the folder: ``!function`` and ``process_docs`` entries), and a path that is not a folder."""
    if include_path is None:
        return
    if not trust_remote_code:
        raise UsageError(f"--include-path {include_path!r}: lm_eval task YAML can run Python from that folder "
                         f"(!function entries); pass --trust-remote-code to allow it")
    if not os.path.isdir(include_path):
        raise UsageError(f"--include-path {include_path!r} is not a folder")


@dataclass
class TaskPlan:
    """Tasks checked before any measurement: the TaskManager that knows them, and their names."""

    manager: object
    tasks: list[str]


@contextmanager
def _quiet_lm_eval():
    """lm_eval logs warnings while it indexes and builds tasks; with no logging configured they
    reach stderr through logging's last-resort handler. The user sees our one line instead."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def prepare_tasks(tasks: list[str], include_path: str | None = None) -> TaskPlan:
    """Check, before anything is measured, that every task exists and its data can be had.

    Each task is built once (lm_eval downloads or reads its dataset then): from the Hub when it
    answers, otherwise in offline mode from the local datasets cache, which fails at once when the
    data is not there. A failure is one UsageError naming the task.
    """
    if not lm_eval_available():
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    from lm_eval.tasks import TaskManager

    from .data import offline_unless_hub_reachable

    with _quiet_lm_eval():
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown lm_eval task(s) {', '.join(unknown)} "
                         f"(see `lm_eval ls tasks`; local task YAMLs: --include-path)")
    for task in tasks:
        where = ""
        try:
            with _quiet_lm_eval(), offline_unless_hub_reachable() as where:
                manager.load([task])
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001  (network, cache, a broken task YAML: cannot run here)
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise UsageError(f"--tasks: the data of lm_eval task {task!r} cannot be had: {where}{reason}") from None
    return TaskPlan(manager=manager, tasks=list(tasks))


def run_tasks(model, tokenizer, tasks: list[str] | TaskPlan, *, device, limit: int | float | None = None,
              num_fewshot: int | None = None, include_path: str | None = None, batch_size: int = 1,
              seed: int = 0) -> dict:
    """{task: {metric: value}} for every task, as lm_eval reports them (numbers only).

    ``tasks`` is a TaskPlan from ``prepare_tasks`` (or task names, checked here); the data is read
    the way the plan found it (offline from the cache when the Hub is unreachable)."""
    plan = tasks if isinstance(tasks, TaskPlan) else prepare_tasks(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from .data import offline_unless_hub_reachable

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    with offline_unless_hub_reachable():
        output = lm_eval.simple_evaluate(model=wrapped, tasks=list(plan.tasks), limit=limit, num_fewshot=num_fewshot,
                                         task_manager=plan.manager, random_seed=seed, numpy_random_seed=seed,
                                         torch_random_seed=seed, fewshot_random_seed=seed)
    return {task: {metric: value for metric, value in values.items()
                   if isinstance(value, numbers.Real) and not isinstance(value, bool)}
            for task, values in output["results"].items()}
