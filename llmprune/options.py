"""Options declared once, on the class that uses them: name, type, default, range and help.

The command line flags (``--name-with-dashes``), the recipe schema and its checks, what ``sweep``
passes through to a method, and the memory estimate's inputs are all derived from these
declarations. This module imports neither torch nor transformers: arguments are parsed and checked
before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import numbers
from dataclasses import dataclass

from .errors import UsageError

# Kinds of value besides bool/int/float/str: "number" (a real number given as text on the command
# line, e.g. --sparsity), "str_list" (one or more strings), "schedule" (uniform, owl or numbers),
# "int_list" (integers, or their comma-separated text).
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", "number": "a number",
               str: "a string", "str_list": "a list of strings", "schedule": "uniform, owl or a list of numbers",
               "int_list": "a list of integers"}


@dataclass(frozen=True)
class Option:
    """One setting. ``minimum``/``maximum`` bound numbers (``exclusive`` makes both bounds open);
    ``choices`` lists the allowed words; ``default=None`` means "decided later" (e.g. sparsity)."""

    name: str
    type: object
    default: object
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False      # both bounds open
    exclusive_max: bool = False  # only the upper bound open: [minimum, maximum)
    choices: tuple = ()
    metavar: str | None = None
    aliases: tuple = ()  # further (hidden) flags with the same meaning, e.g. an old name
    in_recipes: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """The allowed values in words, for error messages."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        low = None if self.minimum is None else ("(" if self.exclusive else "[") + f"{self.minimum:g}"
        open_max = self.exclusive or self.exclusive_max
        high = None if self.maximum is None else f"{self.maximum:g}" + (")" if open_max else "]")
        word = "a fraction" if (self.minimum, self.maximum) == (0, 1) else _KIND_WORDS.get(self.type, "a value")
        if low and high:
            return f"{word} in {low}, {high}"
        if low:
            return f"{word} {'>' if self.exclusive else '>='} {self.minimum:g}"
        if high:
            return f"{word} {'<' if open_max else '<='} {self.maximum:g}"
        return word

    def has_type(self, value) -> bool:
        kind = self.type
        if value is None:
            return self.default is None or kind is str
        if kind is bool:
            return isinstance(value, bool)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if kind in (float, "number"):
            return isinstance(value, numbers.Real) and not isinstance(value, bool)
        if kind is str:
            return isinstance(value, str)
        if kind == "str_list":
            return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                               and all(isinstance(v, str) for v in value))
        if kind == "schedule":
            return isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value))
        if kind == "int_list":
            return isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value))
        return True

    def check(self, value):
        """The value if it has the declared type and range, else one UsageError naming the flag."""
        text_number = self.type == "number" and isinstance(value, str)  # a flag's text: its stage converts it
        if not (text_number or self.has_type(value)):
            raise UsageError(f"{self.flag} must be {self.describe()}, got {value!r}")
        if value is None:
            if self.choices and self.default is not None:  # a word from a list: "not given" is not one
                raise UsageError(f"{self.flag} must be {self.describe()}, got None")
            return value
        if self.type == "str_list" and isinstance(value, str):
            value = [value]
        if self.choices and value not in self.choices:
            raise UsageError(f"{self.flag} must be {self.describe()}, got {value!r}")
        if self.type in (int, float) and not self._in_range(value):
            raise UsageError(f"{self.flag} must be {self.describe()}, got {value!r}")
        return value

    def _in_range(self, value) -> bool:
        if value != value:  # NaN
            return False
        if self.minimum is not None and (value <= self.minimum if self.exclusive else value < self.minimum):
            return False
        open_max = self.exclusive or self.exclusive_max
        return not (self.maximum is not None and (value >= self.maximum if open_max else value > self.maximum))


def find(options, name: str) -> Option:
    return next(o for o in options if o.name == name)


def defaults(options) -> dict:
    return {o.name: o.default for o in options}


def check_values(options, values: dict) -> dict:
    """Every declared option's value (given, else its default), each checked."""
    return {o.name: o.check(values.get(o.name, o.default)) for o in options}


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, options, seen: set | None = None) -> None:
    """One flag per option. Defaults are left out (argparse.SUPPRESS), so that the parsed namespace
    holds only what was given: defaults, recipe fields and flags are then layered in that order.
    ``seen`` skips options already added (two methods may share a declaration)."""
    for option in options:
        if seen is not None:
            if option.name in seen:
                continue
            seen.add(option.name)
        help_text = option.help.replace("%", "%%")
        common = dict(dest=option.name, default=argparse.SUPPRESS, help=help_text)
        flags = [option.flag]
        if option.type is bool:
            parser.add_argument(*flags, action="store_true", **common)
        elif option.type == "str_list":
            parser.add_argument(*flags, nargs="+", metavar=option.metavar or "SOURCE", **common)
        else:
            convert = option.type if option.type in (int, float) else None
            parser.add_argument(*flags, type=convert, metavar=option.metavar, **common)
        for alias in option.aliases:  # hidden: an older name of the same flag
            parser.add_argument(alias, dest=option.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                **({"action": "store_true"} if option.type is bool else
                                   {"type": option.type if option.type in (int, float) else None,
                                    **({"nargs": "+"} if option.type == "str_list" else {})}))
