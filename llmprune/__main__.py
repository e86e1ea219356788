"""``python -m llmprune``: dispatch to the pruning run (llmprune.cli) or a subcommand (sweep, eval),
and turn the package's errors into one line on stderr and an exit code. Arguments are checked
before torch or transformers are imported."""

from __future__ import annotations

import sys

from .errors import NumericalError, OutputError, UsageError

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .save import WRITTEN

    written = len(WRITTEN)
    try:
        from .commands import SUBCOMMANDS

        if argv and argv[0] in SUBCOMMANDS:  # python -m llmprune sweep|eval ...
            return SUBCOMMANDS[argv[0]](argv[1:])
        from .cli import run_argv

        run_argv(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NumericalError as error:
        print(f"numerical failure: {error}", file=sys.stderr)
        return 1
    except OutputError as error:  # disk full, permission lost: no output folder, no temporary left
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a save in progress has removed its temporary folder
        done = WRITTEN[written:]
        print(f"interrupted; the output folder {str(done[-1])!r} had been written completely" if done
              else "interrupted; no output folder was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
