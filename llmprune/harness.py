"""lm-evaluation-harness tasks run in process on an already loaded model (optional: needs ``lm_eval``).

lm_eval's ``HFLM`` wraps the model and tokenizer we loaded (no second load); tasks come from
lm_eval's registry, plus any task YAML under ``include_path`` (local tasks run offline).
"""

from __future__ import annotations

import numbers

from .errors import UsageError

INSTALL_HINT = "pip install lm_eval (or: pip install 'llmprune[eval]')"


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401  (availability probe)
    except ImportError:
        return False
    return True


def run_tasks(model, tokenizer, tasks: list[str], *, device, limit: int | float | None = None,
              num_fewshot: int | None = None, include_path: str | None = None, batch_size: int = 1,
              seed: int = 0) -> dict:
    """{task: {metric: value}} for every task, as lm_eval reports them (numbers only)."""
    if not lm_eval_available():
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown lm_eval task(s) {', '.join(unknown)} "
                         f"(see `lm_eval ls tasks`; local task YAMLs: --include-path)")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                     task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                     torch_random_seed=seed, fewshot_random_seed=seed)
    return {task: {metric: value for metric, value in values.items()
                   if isinstance(value, numbers.Real) and not isinstance(value, bool)}
            for task, values in output["results"].items()}
