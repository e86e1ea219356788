"""``python -m llmprune``: dispatch to the pruning run (llmprune.cli) or a subcommand (sweep, eval),
and turn the package's errors into one line on stderr and an exit code. Arguments are checked
before torch or transformers are imported."""

from __future__ import annotations

import sys

from .errors import NumericalError, OutputError, UsageError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .guard import RunGuard, Terminated

    # Every message is redacted: a token pasted into a flag (a repository id, say) is not printed.
    from .save import WRITTEN, redact

    written = len(WRITTEN)
    guard = RunGuard()  # SIGTERM ends the run as Ctrl-C does; the run's output locks are released at the end
    try:
        from .commands import SUBCOMMANDS

        if argv and argv[0] in SUBCOMMANDS:  # python -m llmprune sweep|eval ...
            return SUBCOMMANDS[argv[0]](argv[1:])
        from .cli import run_argv

        run_argv(argv)
    except UsageError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    except NumericalError as error:
        print(f"numerical failure: {redact(str(error))}", file=sys.stderr)
        return 1
    except OutputError as error:  # disk full, permission lost: no output folder, no temporary left
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: a save in progress has removed its temporary folder
        done, word = WRITTEN[written:], "terminated" if isinstance(error, Terminated) else "interrupted"
        print(redact(f"{word}; the output folder {str(done[-1])!r} had been written completely") if done
              else f"{word}; no output folder was written", file=sys.stderr)
        return 143 if isinstance(error, Terminated) else 130
    finally:
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
