"""The subcommands ``sweep`` and ``eval``: their flags -> plain keyword arguments.

``python -m llmprune --model ...`` (no subcommand) is the pruning run of ``__main__``.
"""

from __future__ import annotations

import argparse

from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        raise UsageError(message.replace("\r", "\\r").replace("\n", "\\n"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune sweep",
                description="Prune one model many ways and plot perplexity against sparsity. Writes "
                            "sweep.md, sweep.json and sweep.png; no model folders.")
    p.add_argument("--model", required=True, help="Hub id, local HF folder, or built-in alias llama")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="comma-separated methods")
    p.add_argument("--sparsities", default="0.1,0.2,...,0.8",
                   help='comma-separated, "a,b,...,z" continues the step (default 0.1,0.2,...,0.8)')
    p.add_argument("--patterns", default="", help="comma-separated N:M patterns, e.g. 2:4,4:8 (default none)")
    p.add_argument("--schedules", default="uniform", help="uniform, owl or uniform,owl (unstructured runs)")
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--calib-data", nargs="+", default=["default"], metavar="SOURCE")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", nargs="+", default=["default"], metavar="SOURCE")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=16384, help="0 = all")
    p.add_argument("--batch-size", type=int, default=1)
    from .methods import METHODS, method_options
    from .options import add_arguments

    seen = set()
    for name in METHODS:  # each method's own options, passed to the runs of that method
        add_arguments(p, method_options(name), seen)
    p.add_argument("--output", default=None, help="folder for the table, JSON and plot (default sweeps/<model>)")
    p.add_argument("--overwrite", action="store_true")
    _common(p)
    return p


def run_sweep_command(argv: list[str]) -> int:
    from .sweep import default_output, format_summary, parse_sparsities, plan_runs, run_sweep

    args = sweep_parser().parse_args(argv)
    for name in ("nsamples", "seqlen", "eval_seqlen", "batch_size"):
        if getattr(args, name) < (2 if "seqlen" in name else 1):
            raise UsageError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.eval_tokens < 0:
        raise UsageError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    runs = plan_runs(split(args.methods), parse_sparsities(args.sparsities), split(args.patterns),
                     split(args.schedules) or ["uniform"])
    from .methods import METHODS, method_options
    from .options import check_values

    given = vars(args)
    options = {name: check_values(method_options(name), given) for name in METHODS}
    output = args.output or default_output(args.model)
    results = run_sweep(args.model, runs, output=output, calib_data=args.calib_data, eval_data=args.eval_data,
                        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval_seqlen=args.eval_seqlen,
                        eval_tokens=args.eval_tokens, device=args.device, dtype=args.dtype,
                        batch_size=args.batch_size, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                        overwrite=args.overwrite, progress=not args.no_progress,
                        trust_remote_code=args.trust_remote_code, method_options=options)
    print("\nllmprune sweep\n" + format_summary(results))
    print(f"wrote {output}/sweep.md, sweep.json, sweep.png")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune eval",
                description="Measure a model or an llmprune output folder: perplexity with the declared "
                            "protocol, optionally speed and lm-evaluation-harness tasks.")
    p.add_argument("model", metavar="MODEL_OR_FOLDER", help="Hub id, local folder, or built-in alias llama")
    p.add_argument("--eval-data", "--data", dest="data", nargs="+", default=["default"], metavar="SOURCE",
                   help='perplexity data sources, or "none"')
    p.add_argument("--eval-seqlen", "--seqlen", dest="seqlen", type=int, default=1024,
                   help="tokens per perplexity window (default 1024)")
    p.add_argument("--eval-tokens", "--tokens", dest="tokens", type=int, default=16384,
                   help="at most this many tokens (default 16384; 0 = all)")
    p.add_argument("--speed", action="store_true", help="measure prefill and decode tokens/s")
    p.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (needs lm_eval)")
    p.add_argument("--limit", type=float, default=None, help="lm_eval: examples per task (or fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm_eval: few-shot examples")
    p.add_argument("--include-path", default=None, metavar="DIR", help="lm_eval: a folder of extra task YAMLs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    _common(p)
    return p


def run_eval_command(argv: list[str]) -> int:
    import json
    import time

    args = eval_parser().parse_args(argv)
    if args.seqlen < 2 or args.tokens < 0:
        raise UsageError("--eval-seqlen must be >= 2 and --eval-tokens >= 0")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    sources = None if [s.lower() for s in args.data] == ["none"] else args.data
    if sources is None and not tasks and not args.speed:
        raise UsageError("nothing to measure: --eval-data none without --speed or --tasks")
    from . import data
    from .api import check_device
    from .evaluate import count_parameters, measure_speed, perplexity, tokenizer_adds_bos, weight_bytes
    from .harness import INSTALL_HINT, lm_eval_available
    from .models.loading import load_model

    if tasks and not lm_eval_available():  # before loading anything
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    compute = check_device(args.device)
    from .job import resolve_dtype

    dtype = resolve_dtype(args.dtype, compute)
    if sources is not None:
        data.check_sources(sources)
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(compute)
    results = {"model": args.model, "device": str(compute), "dtype": dtype,
               "parameters": count_parameters(model), "weight_bytes": weight_bytes(model)}
    rows = [("model", args.model), ("parameters", f"{results['parameters']['nonzero']:,} nonzero of "
                                                   f"{results['parameters']['parameters']:,}")]
    if sources is not None:
        ids = data.evaluation_ids(tokenizer, sources, args.tokens or None, args.seqlen, flag="--eval-seqlen")
        bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        ppl = perplexity(model, ids, args.seqlen, bos, compute, not args.no_progress).as_dict()
        results["perplexity"] = {**ppl, "data": list(sources)}
        rows.append(("perplexity", f"{ppl['perplexity']:.3f}  [{ppl['protocol']}]"))
    if args.speed:
        results["speed"] = measure_speed(model, compute, progress=not args.no_progress)
        rows.append(("speed", f"prefill {results['speed']['prefill_tokens_per_s']:.0f} tokens/s, decode "
                              f"{results['speed']['decode_tokens_per_s']:.1f} tokens/s"))
    if tasks:
        from .harness import run_tasks

        started = time.perf_counter()
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        results["tasks"] = run_tasks(model, tokenizer, tasks, device=compute, limit=limit,
                                     num_fewshot=args.num_fewshot, include_path=args.include_path, seed=args.seed)
        results["tasks_seconds"] = time.perf_counter() - started
        for task, metrics in results["tasks"].items():
            rows.append((task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    from .report import format_rows

    print("\nllmprune eval\n" + format_rows(rows), flush=True)
    return 0


def run_recover_command(argv: list[str]) -> int:
    from .stages.recover import run_recover_command as run

    return run(argv)


SUBCOMMANDS = {"sweep": run_sweep_command, "eval": run_eval_command, "recover": run_recover_command}
