"""The error types users see, each reported as one line on stderr: bad input (exit code 2),
numerical failure and failure to write the output (exit code 1)."""


class UsageError(Exception):
    """A request that cannot be carried out as given (bad flag, missing file, impossible pattern).

    The CLI prints ``error: <message>`` and exits with code 2; nothing is written.
    """


class NumericalError(Exception):
    """NaN/inf in activations or statistics, or a Hessian that stays singular: names the module."""


class OutputError(Exception):
    """Writing the output folder failed in the environment (disk full, permission lost).

    The CLI prints ``error: <message>`` and exits with code 1; no output folder and no
    temporary folder are left behind (an existing folder being replaced is kept).
    """


class PublishError(OutputError):
    """Publishing a complete output folder to the Hub failed (no token, no network, refused).

    The CLI prints ``error: <message>`` and exits with code 1; the local folder is complete and kept.
    """
