"""The one error type users see: bad input, reported as one line on stderr with exit code 2."""


class UsageError(Exception):
    """A request that cannot be carried out as given (bad flag, missing file, impossible pattern).

    The CLI prints ``error: <message>`` and exits with code 2; nothing is written.
    """


class NumericalError(Exception):
    """NaN/inf in activations or statistics, or a Hessian that stays singular: names the module."""
