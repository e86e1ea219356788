"""Command line: flags -> plain keyword arguments for ``llmprune.cli.run``; nothing below sees argparse."""

from __future__ import annotations

import argparse
import sys

from .data import DEFAULT_MAX_DATA_BYTES, MAX_DATA_BYTES_HELP
from .errors import NumericalError, OutputError, UsageError

EPILOG = """\
N:M patterns follow the SparseGPT/Wanda papers: in every group of M consecutive weights along the
input dimension of each row, N are set to zero (2:4 and 4:8 both remove 50%%). With --pattern N:M,
--sparsity may be omitted (it is N/M); if given it must equal N/M, otherwise the run is refused.

Data SOURCEs: a .txt, .txt.gz, .jsonl (field "text") or .parquet file, or a folder of them; the
presets wikitext2, c4, ptb (Hugging Face datasets, need the Hub or its cache); or "default", the
docstrings of this Python's standard library (offline; calibration and evaluation parts share no
file). Unstructured results are saved dense, with zeros.

Several processes: accelerate launch --num_processes N -m llmprune ... splits the calibration
samples (on a CPU-only machine add --multi_gpu, which selects accelerate's torchrun launcher; gloo
is used on CPU, NCCL on GPUs). Only the main process writes the output.

Exit codes: 0 success, 2 bad input (nothing written), 1 numerical failure or output that cannot be
written (disk full: no folder, no temporary left), 130 interrupted (no partial output folder).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2 (argparse quotes some values raw)
        raise UsageError(message.replace("\r", "\\r").replace("\n", "\\n"))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune", description="Prune a Hugging Face causal LM and measure it.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="a YAML recipe (model, data, stages); flags given here override its fields")
    p.add_argument("--model", required=True,
                   help="Hub id, local HF folder, or built-in alias: llama / smollm2 (SmolLM2-135M, offline)")
    p.add_argument("--method", default="wanda", help="magnitude | wanda | sparsegpt | structured | dynamic (default wanda)")
    p.add_argument("--sparsity", default=None,
                   help="fraction of each decoder linear layer removed, 0 <= s < 1 (default 0.5; N/M with --pattern)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4, 4:8")
    p.add_argument("--calib-data", nargs="+", default=["default"], metavar="SOURCE")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32; papers: 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512; papers: 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", nargs="+", default=["default"], metavar="SOURCE", help='sources, or "none"')
    p.add_argument("--max-data-bytes", type=int, default=DEFAULT_MAX_DATA_BYTES, metavar="N", help=MAX_DATA_BYTES_HELP)
    p.add_argument("--eval-seqlen", type=int, default=1024, help="tokens per perplexity window (default 1024)")
    p.add_argument("--eval-tokens", type=int, default=16384,
                   help="evaluate on at most this many tokens (default 16384; 0 = all)")
    p.add_argument("--output", default=None, help="output folder (default: pruned/<model>-<method>-<pattern>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per forward call")
    p.add_argument("--schedule", default="uniform",
                   help="per-layer sparsity: uniform (default) | owl (outlier-weighted, OWL paper) | a "
                        "comma-separated list with one sparsity per decoder layer")
    p.add_argument("--owl-m", type=float, default=5.0, help="owl: outlier threshold M x mean score (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="owl: layer sparsities range over target +- lambda (default 0.08)")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt: columns per block")
    p.add_argument("--percdamp", type=float, default=0.01, help="sparsegpt: dampening, fraction of mean diag(H)")
    g = p.add_argument_group("structured pruning (--method structured)")
    g.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to remove")
    g.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons to remove")
    g.add_argument("--layers", type=int, default=0, help="number of whole decoder layers to remove")
    g.add_argument("--score", default="wanda", help="magnitude | wanda | flap (default wanda)")
    g.add_argument("--allocation", default="uniform",
                   help="uniform (same count per layer, plain HF folder) | global (ranked across layers)")
    g.add_argument("--gqa", default="groups",
                   help="groups: remove whole KV groups | queries: remove query heads evenly per group")
    g.add_argument("--round-to", type=int, default=1, help="keep FFN widths a multiple of N")
    g.add_argument("--round-heads-to", type=int, default=1, help="keep query-head counts a multiple of N")
    d = p.add_argument_group("dynamic inference (--method dynamic)")
    d.add_argument("--early-exit", action="store_true",
                   help="tokens may stop at an exit layer (the default when no dynamic mode is named)")
    d.add_argument("--token-skip", action="store_true", help="tokens may skip a layer's MLP (fitted routers)")
    d.add_argument("--max-ppl-increase", type=float, default=None,
                   help="calibrate to at most this relative perplexity increase (default 0.05 = 5%%)")
    d.add_argument("--min-agreement", type=float, default=None,
                   help="calibrate to at least this top-1 agreement with the full model, e.g. 0.95")
    d.add_argument("--exit-layers", default=None, metavar="LIST",
                   help="layer counts after which tokens may exit, e.g. 8,12,16 (default every 2nd from L/4)")
    d.add_argument("--lossless", action="store_true",
                   help="self-speculative decoding: the full model's greedy tokens, exactly")
    p.add_argument("--speed", action="store_true", help="measure prefill/decode tokens/s before and after "
                   "(always on for structured)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="commit every finished layer to DIR; rerunning the same command resumes there "
                        "(a different command is refused); DIR is deleted once the output is written")
    b = p.add_argument_group("big models and several processes")
    b.add_argument("--device-map", default=None, metavar="MAP",
                   help="load through accelerate: auto | balanced | balanced_low_0 | sequential | FILE.json "
                        "({module: device}); each layer is pruned where it lives (GPUs, CPU, disk)")
    b.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    b.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: where weights that fit nowhere else are offloaded")
    b.add_argument("--stream", action="store_true",
                   help="models larger than memory: read, prune and write one decoder layer at a time "
                        "(sharded output; no perplexity)")
    b.add_argument("--activations-on-disk", default=None, metavar="DIR",
                   help="with --stream: keep calibration activations in memory-mapped files under DIR")
    b.add_argument("--force", action="store_true",
                   help="run even when the memory estimate says it will not fit")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the output folder to this Hugging Face Hub repository (token: HF_TOKEN or "
                        "`hf auth login`); the local folder is written first and kept either way")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Every message is redacted: a token pasted into a flag (a repository id, say) is not printed.
    from .save import WRITTEN, redact

    written = len(WRITTEN)
    try:
        from .commands import SUBCOMMANDS

        if argv and argv[0] in SUBCOMMANDS:  # python -m llmprune sweep|eval ...
            return SUBCOMMANDS[argv[0]](argv[1:])
        if any(a == "--recipe" or a.startswith("--recipe=") for a in argv):
            from .pipeline import run_recipe_command

            run_recipe_command(argv, build_parser())
            return 0
        args = build_parser().parse_args(argv)
        from .cli import run
        from .data import max_data_bytes

        with max_data_bytes(args.max_data_bytes):
            run(**{k.replace("-", "_"): v for k, v in vars(args).items() if k not in ("recipe", "max_data_bytes")},
                argv=argv)
    except UsageError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    except NumericalError as error:
        print(f"numerical failure: {redact(str(error))}", file=sys.stderr)
        return 1
    except OutputError as error:  # disk full, permission lost: no output folder, no temporary left
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a save in progress has removed its temporary folder
        done = WRITTEN[written:]
        print(redact(f"interrupted; the output folder {str(done[-1])!r} had been written completely") if done
              else "interrupted; no output folder was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
