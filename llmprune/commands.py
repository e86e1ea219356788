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
    output = args.output or default_output(args.model)
    results = run_sweep(args.model, runs, output=output, calib_data=args.calib_data, eval_data=args.eval_data,
                        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval_seqlen=args.eval_seqlen,
                        eval_tokens=args.eval_tokens, device=args.device, dtype=args.dtype,
                        batch_size=args.batch_size, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                        overwrite=args.overwrite, progress=not args.no_progress,
                        trust_remote_code=args.trust_remote_code)
    print("\nllmprune sweep\n" + format_summary(results))
    print(f"wrote {output}/sweep.md, sweep.json, sweep.png")
    return 0


SUBCOMMANDS = {"sweep": run_sweep_command}
