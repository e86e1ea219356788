"""Property-based robustness: the CLI and the Python API under random and hostile input.

Every CLI run (in process, through ``llmprune.__main__.main``) ends in success (exit 0, a
complete output folder) or in one clear refusal (exit 2, one ``error:`` line on stderr, no
traceback, the output untouched and no temporary folders left); exit 1 is accepted only as a
one-line numerical failure. Every API call succeeds or raises ``UsageError`` with a one-line
message, leaving the model as it was. The examples are derandomised (fixed seed, no example
database), so CI sees the same cases every time.

A hostile case starts from a valid request and replaces one or two of its values with hostile
ones (non-numbers, NaN, infinities, negative or huge counts, garbage N:M strings and devices,
missing, empty or binary data files, folders without text, paths with spaces or unicode, output
names at the file-system limit), so the refusals are spread over every check rather than all
being the first one. Every listed hostile value is also tried once on its own (explicit
examples); valid requests with random paths and options must all succeed.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

import llmprune
from llmprune.__main__ import main
from llmprune.errors import UsageError
from llmprune.methods.masks import NMPattern

from conftest import AUSTEN, SMALL_TEXT, tiny_model

pytestmark = pytest.mark.slow  # hundreds of hypothesis examples, each a run on a tiny model

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLI_HOSTILE_EXAMPLES = 200
CLI_VALID_EXAMPLES = 40
API_EXAMPLES = 300
STRUCTURED_API_EXAMPLES = 250

COMPLETE = {"config.json", "model.safetensors", "llmprune.json", "README.md"}

# Text as it can reach argv: any unicode but NUL (and no lone surrogates).
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
# One path component: no separator, not "." or "..", never mistaken for our own temporary folders.
NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
               max_size=16).filter(lambda s: s not in (".", "..") and ".tmp-" not in s and ".old-" not in s)


def _text(length: int) -> str:
    if AUSTEN.is_dir():
        with gzip.open(AUSTEN / "persuasion.txt.gz", "rt", encoding="utf-8") as handle:
            return handle.read(length)
    return SMALL_TEXT[:length]


# ----------------------------------------------------------------------------- the world


@dataclass
class World:
    root: Path
    cwd: Path
    sources: dict  # token -> path
    models: dict  # token -> path
    counter: list

    def example_dir(self) -> Path:
        self.counter[0] += 1
        folder = self.root / "examples" / f"ex{self.counter[0]}"
        folder.mkdir(parents=True)
        return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    data.mkdir()
    text = _text(12_000)  # a few thousand tokens: "all of it" stays cheap to evaluate

    def write(name: str, content) -> Path:
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else lambda c: path.write_text(c, encoding="utf-8"))(content)
        return path

    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = {
        "@text": write("text.txt", text),
        "@jsonl": write("text.jsonl", "\n".join(json.dumps({"text": p}) for p in text.split("\n\n")) + "\n"),
        "@gz": write("text.txt.gz", gzip.compress(text.encode("utf-8"))),
        "@spaces": write("my data \u00e9 \U0001f680.txt", text),
        "@folder": write("folder/a.txt", text).parent,
        "@empty": write("empty.txt", ""),
        "@blank": write("blank.txt", "  \n\t\n  "),
        "@nul": write("nul.txt", b"some text\x00\x01\x02 more"),
        "@invalid_utf8": write("invalid.txt", bytes(range(128, 256)) * 4),
        "@binary_folder": write("binary_folder/x.txt", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe").parent,
        "@unsupported_folder": write("unsupported_folder/x.csv", "text\nhello\n").parent,
        "@unsupported": write("data.csv", "text\nhello\n"),
        "@bad_jsonl": write("bad.jsonl", "{not json\n"),
        "@notext_jsonl": write("notext.jsonl", '{"content": "hello"}\n'),
        "@nontext_jsonl": write("nontext.jsonl", '{"text": 5}\n'),
        "@nested_jsonl": write("nested.jsonl", "[" * 100_000 + "\n"),
        "@bad_gz": write("bad.txt.gz", b"this is not gzip"),
        "@bad_parquet": write("bad.parquet", b"PAR1 this is not parquet PAR1"),
        "@tiny": write("tiny.txt", "Hi."),
    }
    sources["@parquet"] = data / "text.parquet"
    pq.write_table(pa.table({"text": text.split("\n\n")}), sources["@parquet"])
    sources["@int_parquet"] = data / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), sources["@int_parquet"])
    (data / "empty_folder").mkdir()
    sources["@empty_folder"] = data / "empty_folder"
    sources["@missing"] = data / "missing.txt"
    sources["@missing_unicode"] = data / "n\u00e4 m\u00e9 \u6587.txt"
    os.mkfifo(data / "fifo.txt")
    sources["@fifo"] = data / "fifo.txt"
    sources["@devnull"] = Path("/dev/null")

    models = {"@model": root / "tiny-llama", "@missing_model": root / "no such model",
              "@empty_model": root / "empty-model", "@broken_model": root / "broken-model",
              "@no_tokenizer": root / "no-tokenizer", "@gpt2": root / "tiny-gpt2"}
    model = tiny_model("llama")
    model.save_pretrained(models["@model"])
    tokenizer.save_pretrained(models["@model"])
    model.save_pretrained(models["@no_tokenizer"])
    models["@empty_model"].mkdir()
    models["@broken_model"].mkdir()
    (models["@broken_model"] / "config.json").write_text("{this is not json")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(models["@gpt2"])
    tokenizer.save_pretrained(models["@gpt2"])

    cwd = root / "cwd"  # relative names resolve here, and the default output goes here
    cwd.mkdir()
    from llmprune import evaluate

    real_speed = evaluate.measure_speed

    def fast_speed(model, device=None, **_):  # the real code path, a few tokens instead of 512 + 64
        return real_speed(model, device, prompt_tokens=8, new_tokens=2, repeats=1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and contention on small CI machines)
    patch = pytest.MonkeyPatch()
    patch.chdir(cwd)
    patch.setattr("llmprune.data._hub_reachable", lambda: False)  # presets: offline, fail in milliseconds
    patch.setattr("llmprune.models.loading.hub_reachable", lambda: False)
    patch.setattr("llmprune.evaluate.measure_speed", fast_speed)
    yield World(root=root, cwd=cwd, sources=sources, models=models, counter=[0])
    patch.undo()
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- CLI cases

VALID_SOURCES = ["@text", "@text", "@text", "@jsonl", "@gz", "@parquet", "@folder", "@spaces"]
HOSTILE_SOURCES = ["@empty", "@blank", "@nul", "@invalid_utf8", "@binary_folder", "@unsupported_folder",
                   "@unsupported", "@bad_jsonl", "@notext_jsonl", "@nontext_jsonl", "@nested_jsonl", "@bad_gz",
                   "@bad_parquet", "@int_parquet", "@tiny", "@empty_folder", "@missing", "@missing_unicode",
                   "@fifo", "@devnull", "wikitext2", "c4", "ptb", "wikitext103", "none", "", " ", "."]


def generated_source(valid: bool):
    kinds = ["text"] if valid else ["missing", "binary", "empty"]
    return st.tuples(st.just("gen"), NAME, st.sampled_from(kinds))


def sources_strategy(valid: bool, evaluation: bool):
    one = (st.one_of(st.sampled_from(VALID_SOURCES), generated_source(True)) if valid else
           st.one_of(st.sampled_from(HOSTILE_SOURCES), generated_source(False), ARG_TEXT))
    if valid and evaluation:
        return st.one_of(st.just(["none"]), st.lists(one, min_size=1, max_size=2))
    if valid:
        return st.lists(one, min_size=1, max_size=2)
    good = st.one_of(st.sampled_from(VALID_SOURCES))
    return st.one_of(st.lists(one, min_size=1, max_size=2), st.tuples(good, one).map(list), st.just([]))


INT_TEXT = st.one_of(st.integers(max_value=0).map(str), st.integers(min_value=10**9).map(str), ARG_TEXT)
FLOAT_TEXT = st.one_of(st.floats().map(repr), ARG_TEXT)
NM_TEXT = st.tuples(st.integers(-3, 300), st.integers(-3, 300)).map(lambda t: f"{t[0]}:{t[1]}")
HOSTILE_SOURCE_LISTS = ([[s] for s in HOSTILE_SOURCES] + [["@text", "@missing"], ["@text", "@empty"], []]
                        + [[("gen", "x y \u00e9 \u6587", kind)] for kind in ("missing", "binary", "empty")])
# field -> (hostile values every run tries, a generator of more)
HOSTILE_VALUES = {
    "model": (["@missing_model", "@empty_model", "@broken_model", "@no_tokenizer", "@gpt2", "some-org/some-model",
               "", "~no_such_user_llmprune/model", None], st.nothing()),
    "method": (["obs", "", "WANDA", "structured ", "Magnitude", "none"], ARG_TEXT),
    "sparsity": (["nan", "-nan", "inf", "-inf", "1", "1.0", "-0.1", "1.5", "abc", "", " ", "0x1p-1", "1e999",
                  "-1e999", "0.5.5", "\u00bd", "0,5", "None", "True", "0.99999999999", "-0", "1e-320",
                  "\u0660.\u0665", "0.5\n"], FLOAT_TEXT),
    "pattern": (["2:3", "0:4", "4:4", "5:4", "2:0", "0:0", "-2:4", "2:4:8", "2/4", "2 :4", " 2:4 ", "4:4\n",
                 "2:4\n", "1:99999999999999999999999", "3:128", "1:256", "99999999999999999999:100000000000000000000",
                 "N:M", "", "Unstructured", "unstructured ", "1:64", "63:64", "\u0662:\u0664", "\u00b2:\u2074"],
                st.one_of(NM_TEXT, ARG_TEXT)),
    "nsamples": (["0", "-1", "1000000000", str(10**30), str(2**63), "abc", "1.5", "", "1e3", "\u0663", " 2",
                  "0x10", "2**3"], INT_TEXT),
    "seqlen": (["0", "1", "-5", "1000000", "1000000000", str(10**30), "x", "16.0", ""], INT_TEXT),
    "seed": (["-1", str(2**63), str(2**64), str(2**64 - 1), str(-2**63), str(-2**63 - 1), str(10**30),
              str(-10**30), "s", "1.5", ""], st.integers().map(str)),
    "eval_seqlen": (["1", "0", "-1", "1000000000", str(10**30), "x", "3.5"], INT_TEXT),
    "eval_tokens": (["1", "0", "-1", str(10**30), "x", "1e6", "2"], INT_TEXT),
    "device": (["cuda", "cuda:0", "cuda:99", "cuda:-1", "tpu", "", "  ", "cpu:0", "cpu:5", "cpu:-1", "meta", "mps",
                "xla", "cuda:0:0", "cpu,cuda", "CPU", "gpu", "cuda:1e3", "0", "-1", "auto ", "cpu\n"], ARG_TEXT),
    "dtype": (["float8", "", "int8", "torch.float32", "FLOAT32", "half", "float64", "auto ", "bool"], ARG_TEXT),
    "batch_size": (["0", "-1", "x", "1.5", str(10**30)], INT_TEXT),
    "blocksize": (["0", "-1", "x", str(10**30), "1", "3"], INT_TEXT),
    "percdamp": (["nan", "inf", "-inf", "-1", "0", "10", "x", "9.99", "1e-30", ""], FLOAT_TEXT),
    "heads": (["nan", "inf", "-inf", "-0.1", "1", "1.5", "x", "1e999", "", "0.9", "0.999", "1e-300", "-0"],
              FLOAT_TEXT),
    "ffn": (["nan", "inf", "-inf", "-0.1", "1", "1.5", "x", "1e999", "", "0.999", "0.9999", "1e-300"], FLOAT_TEXT),
    "layers": (["-1", "3", "4", str(10**30), "x", "1.5", "2"], INT_TEXT),
    "score": (["", "FLAP", "random", "wanda "], ARG_TEXT),
    "allocation": (["", "none", "Global"], ARG_TEXT),
    "gqa": (["", "kv", "query"], ARG_TEXT),
    "round_to": (["0", "-1", "1000", str(10**30), "x", "128", "127"], INT_TEXT),
    "round_heads_to": (["0", "3", "-2", "x", "4", "5"], INT_TEXT),
    "output": (["@existing_empty", "@existing_nonempty", "@existing_file", "@parent_is_file", "@long", "@near_limit",
                "@empty_string", "@tilde_user", "@nested", "@default", "@blank",
                ("fresh", "with space \u00e9 \U0001f680"), ("fresh", "-dash"), ("nested", "a b", "\u00fc")],
               st.one_of(st.tuples(st.just("fresh"), NAME), st.tuples(st.just("nested"), NAME, NAME))),
    "calib_data": (HOSTILE_SOURCE_LISTS, sources_strategy(valid=False, evaluation=False)),
    "eval_data": (HOSTILE_SOURCE_LISTS, sources_strategy(valid=False, evaluation=True)),
    "extra": ([["--frobnicate"], ["stray"], ["--nsamples"], ["--sparsity=0.5", "--sparsity"], ["--calib-data"],
               ["--eval-data"], ["--model"], ["-x"], ["--"], ["--overwrite=yes"], ["a\nb"], ["--no-progress=1"],
               ["--sp=0.5"], ["--s=1"]],
              st.lists(ARG_TEXT, min_size=1, max_size=2)),
}
HOSTILE = {field: st.one_of(st.sampled_from(values), more) for field, (values, more) in HOSTILE_VALUES.items()}
STRUCTURED_FIELDS = {"heads", "ffn", "layers", "score", "allocation", "gqa", "round_to", "round_heads_to"}
FIELDS = sorted(HOSTILE)


def one_hostile_value(field: str, value) -> dict:
    """A cheap valid request (for the field's method) with ``field`` set to a hostile value."""
    method = ("structured" if field in STRUCTURED_FIELDS else
              "sparsegpt" if field in ("blocksize", "percdamp") else "wanda")
    case = {"model": "@model", "method": method, "sparsity": None, "pattern": "unstructured", "calib_data": ["@text"],
            "eval_data": ["@text"] if field in ("eval_seqlen", "eval_tokens", "eval_data") else ["none"],
            "nsamples": "1", "seqlen": "8", "seed": "0", "eval_seqlen": "32", "eval_tokens": "64", "device": "cpu",
            "dtype": None, "batch_size": "1", "blocksize": None, "percdamp": None, "output": ("fresh", "out"),
            "overwrite": False, "speed": False, "extra": []}
    if method == "structured":
        case.update(heads="0.5", ffn="0.25", layers="0", score="magnitude", allocation="uniform", gqa="groups",
                    round_to=None, round_heads_to=None)
    case[field] = value
    case["hostile"] = [field]
    return case


EVERY_HOSTILE_VALUE = [one_hostile_value(field, value) for field, (values, _) in HOSTILE_VALUES.items()
                       for value in values]


def explicit_examples(cases):
    """``@example(case=...)`` for each case: tried on every run, before the generated ones."""
    def decorate(test):
        for case in reversed(cases):
            test = example(case=case)(test)
        return test
    return decorate


@st.composite
def cli_cases(draw, hostile: bool = True):
    """A valid request; when hostile, one or two of its values are replaced by hostile ones."""
    bad = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)) if hostile else []
    if bad and set(bad) & STRUCTURED_FIELDS and draw(st.integers(0, 3)):
        method = "structured"
    elif bad and set(bad) & {"blocksize", "percdamp"} and draw(st.integers(0, 3)):
        method = "sparsegpt"
    else:
        method = draw(st.sampled_from(["magnitude", "wanda", "sparsegpt", "structured"]))
    pattern = draw(st.sampled_from(["unstructured", "unstructured", "2:4", "4:8", "1:4", "3:8", "1:2"]))
    if pattern == "unstructured":
        sparsity = draw(st.one_of(st.none(), st.floats(0, 0.95).map(repr), st.sampled_from(["0", "0.5", " 0.25 "])))
    else:
        n, m = map(int, pattern.split(":"))
        sparsity = draw(st.sampled_from([None, repr(n / m)]))
    case = {
        "model": "@model", "method": method, "sparsity": sparsity, "pattern": pattern,
        "calib_data": draw(sources_strategy(valid=True, evaluation=False)),
        "eval_data": draw(sources_strategy(valid=True, evaluation=True)),
        "nsamples": str(draw(st.integers(1, 3))), "seqlen": str(draw(st.integers(2, 24))),
        "seed": str(draw(st.integers(0, 2**32))), "eval_seqlen": str(draw(st.integers(8, 32))),
        "eval_tokens": draw(st.sampled_from(["64", "96", "128"])),
        "device": draw(st.sampled_from(["cpu", "auto", None])),
        "dtype": draw(st.sampled_from([None, "auto", "float32", "float32", "bfloat16", "float16"])),
        "batch_size": str(draw(st.integers(1, 3))), "blocksize": draw(st.sampled_from([None, "128", "8", "6", "1"])),
        "percdamp": draw(st.sampled_from([None, "0.01", "0.1", "1"])),
        "output": draw(st.one_of(st.tuples(st.just("fresh"), NAME),
                                 st.sampled_from(["@existing_empty", "@existing_nonempty", "@nested", "@default"]))),
        "overwrite": draw(st.booleans()), "speed": draw(st.integers(0, 5)) == 0, "extra": [],
    }
    if method == "structured":
        heads = draw(st.sampled_from(["0", "0.25", "0.5"]))
        ffn = draw(st.sampled_from(["0", "0.1", "0.25", "0.5"]))
        layers = draw(st.sampled_from(["0", "0", "1", "2"]))
        if heads == ffn == layers == "0":
            ffn = "0.25"
        case.update(heads=heads, ffn=ffn, layers=layers,
                    score=draw(st.sampled_from(["magnitude", "wanda", "flap"])),
                    allocation=draw(st.sampled_from(["uniform", "global"])),
                    gqa=draw(st.sampled_from(["groups", "queries"])),
                    round_to=draw(st.sampled_from([None, "1", "8", "16"])),
                    round_heads_to=draw(st.sampled_from([None, "1", "2"])))
    if case["output"] == "@existing_nonempty":  # valid only with --overwrite
        case["overwrite"] = True
    for field in bad:
        case[field] = draw(HOSTILE[field])
    case["hostile"] = bad
    return case


def resolve_source(world: World, ex: Path, token) -> str:
    if isinstance(token, tuple):  # ("gen", name, kind): a file with a generated name
        _, name, kind = token
        path = ex / "gen" / f"{name}.txt"
        path.parent.mkdir(exist_ok=True)
        if kind == "text":
            shutil.copyfile(world.sources["@text"], path)
        elif kind == "binary":
            path.write_bytes(b"\x00\xff\xfe binary \x00")
        elif kind == "empty":
            path.write_bytes(b"")
        return str(path)
    return str(world.sources[token]) if token in world.sources else token


def resolve_output(world: World, ex: Path, token):
    """(argument or None, the folder the run writes to or None for the default, its state before)."""
    outs = ex / "outs"
    outs.mkdir()
    if isinstance(token, tuple):
        target = outs.joinpath(*token[1:])
        return str(target), target
    if token == "@existing_empty":
        (outs / "empty").mkdir()
        return str(outs / "empty"), outs / "empty"
    if token == "@existing_nonempty":
        (outs / "full").mkdir()
        (outs / "full" / "keep.txt").write_text("precious")
        (outs / "full" / "llmprune.json").write_text("{}")  # an earlier run's folder: --overwrite may replace it
        return str(outs / "full"), outs / "full"
    if token == "@existing_file":
        (outs / "file").write_text("a file")
        return str(outs / "file"), outs / "file"
    if token == "@parent_is_file":
        (outs / "file").write_text("a file")
        return str(outs / "file" / "out"), outs / "file" / "out"
    if token == "@long":  # longer than any file name may be
        return str(outs / ("x" * 300)), outs / ("x" * 300)
    if token == "@near_limit":  # a legal name (250 bytes) whose temporary sibling would not be
        return str(outs / ("\u00e9" * 125)), outs / ("\u00e9" * 125)
    if token == "@nested":
        target = outs / "a b" / "\u00fc\u00f1\u00ee" / "out \U0001f680"
        return str(target), target
    if token == "@empty_string":
        return "", None
    if token == "@blank":
        return " ", world.cwd / " "
    if token == "@tilde_user":
        return "~no_such_user_llmprune/out", None
    assert token == "@default"
    return None, None


def build_argv(world: World, ex: Path, case: dict):
    argv = []
    model = case["model"]
    if model is not None:
        argv.append(f"--model={world.models.get(model, model)}")
    output, target = resolve_output(world, ex, case["output"])
    for flag in ("method", "sparsity", "pattern", "nsamples", "seqlen", "seed", "eval_seqlen", "eval_tokens",
                 "device", "dtype", "batch_size", "blocksize", "percdamp", "heads", "ffn", "layers", "score",
                 "allocation", "gqa", "round_to", "round_heads_to"):
        if case.get(flag) is not None:
            argv.append(f"--{flag.replace('_', '-')}={case[flag]}")
    argv += ["--calib-data", *[resolve_source(world, ex, s) for s in case["calib_data"]]]
    argv += ["--eval-data", *[resolve_source(world, ex, s) for s in case["eval_data"]]]
    if output is not None:
        argv.append(f"--output={output}")
    if case["overwrite"]:
        argv.append("--overwrite")
    if case["speed"]:
        argv.append("--speed")
    argv += ["--no-progress", *case["extra"]]
    return argv, target


def state(path: Path | None):
    """None (absent), "file", or the sorted listing of a folder; never raises."""
    if path is None:
        return None
    p = os.fspath(path)
    try:
        if not os.path.lexists(p):
            return None
        if not os.path.isdir(p):
            return "file"
        return sorted(os.listdir(p))
    except OSError:
        return None


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary or trash folders that an interrupted save would leave beside its target."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [n for n in names if n.startswith(".") and (".tmp-" in n or ".old-" in n)]


def complete(path: Path) -> bool:
    listing = state(path)
    return isinstance(listing, list) and COMPLETE <= set(listing)


def run_cli_case(world, case) -> int:
    """Run one request in process; check the exit code, stderr and the output folder; return the code."""
    for child in world.cwd.iterdir():  # every example starts from an empty working folder
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    ex = world.example_dir()
    argv, target = build_argv(world, ex, case)
    note(f"argv = {argv!r}")
    before = state(target)
    keep = (target / "keep.txt").read_bytes() if isinstance(before, list) and "keep.txt" in before else None
    default_root = world.cwd / "pruned"
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    except SystemExit as exit_:  # only --help may leave main this way (code 0)
        code = exit_.code
        assert code == 0, f"SystemExit({code!r}) escaped main"
    message = err.getvalue()
    note(f"exit {code}, stderr {message!r}")
    assert "Traceback" not in message
    if code == 2:
        assert message.endswith("\n") and message.count("\n") == 1, f"not one line: {message!r}"
        assert message.startswith("error: ") and message[len("error: "):].strip(), message
    elif code == 1:
        assert message.startswith("numerical failure: ") and message.count("\n") == 1, message
    else:
        assert code == 0, f"exit code {code!r}"

    made = [default_root / n for n in state(default_root) or []]
    if code == 0 and not out.getvalue().startswith("usage:"):
        if case["output"] == "@default":
            assert len(made) == 1 and complete(made[0]), made
        elif target is not None:
            assert complete(target), (target, state(target))
        assert all(complete(folder) for folder in made), made
    else:  # refused: nothing written, nothing replaced
        assert state(target) == before, (target, before, state(target))
        if keep is not None:
            assert (target / "keep.txt").read_bytes() == keep
        assert not made, made
    for folder in {ex / "outs", world.cwd, default_root, *([target.parent] if target else [])}:
        assert not leftovers(folder), (folder, leftovers(folder))
    shutil.rmtree(ex, ignore_errors=True)
    return code


@settings(max_examples=CLI_HOSTILE_EXAMPLES, **SETTINGS)
@given(case=cli_cases(hostile=True))
@explicit_examples(EVERY_HOSTILE_VALUE)
def test_cli_hostile_input_ends_in_success_or_one_clear_error(world, case):
    run_cli_case(world, case)


@settings(max_examples=CLI_VALID_EXAMPLES, **SETTINGS)
@given(case=cli_cases(hostile=False))
def test_cli_valid_requests_succeed(world, case):
    assert run_cli_case(world, case) == 0


# ----------------------------------------------------------------------------- API cases


@pytest.fixture(scope="module")
def api_world(world, tokenizer):
    from llmprune import data

    model = tiny_model("llama")
    calibration = data.calibration_ids(tokenizer, [str(world.sources["@text"])], 2, 16, 0)
    return {"model": model, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "calibration": calibration}


def calibration_value(kind: str, valid: torch.Tensor):
    import numpy as np

    return {
        "valid": valid, "int32": valid.int(), "noncontiguous": valid.t().contiguous().t(),
        "one_column": valid[:, :1], "none": None, "list": valid.tolist(), "float": valid.float(),
        "bool": valid > 100, "int8": valid.to(torch.int8), "one_dim": valid[0], "three_dim": valid[None],
        "no_rows": valid[:0], "no_columns": valid[:, :0], "out_of_vocab": valid + 512, "negative": valid - 600,
        "huge_ids": valid + 2**40, "numpy": np.asarray(valid), "string": "calibration", "meta": valid.to("meta"),
    }[kind]


VALID_CALIBRATION = ["valid", "valid", "int32", "noncontiguous", "one_column"]
HOSTILE_CALIBRATION = ["none", "list", "float", "bool", "int8", "one_dim", "three_dim", "no_rows", "no_columns",
                       "out_of_vocab", "negative", "huge_ids", "numpy", "string", "meta"]
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                      st.sampled_from([10**400, complex(0.5, 1), [0.5], (0.5,), {}, b"0.5", Fraction(1, 3),
                                       object()]))
HOSTILE_FRACTION = st.one_of(st.sampled_from([-0.1, 1, 1.0, math.nan, math.inf, -math.inf, "abc", "", True,
                                              10**400, complex(0.5, 1), [0.5], {}, "0.5", 0.999999, 1e-300,
                                              -0.0, Fraction(1, 2)]),
                             st.floats(), ANY_VALUE)
HOSTILE_DEVICE = st.one_of(st.sampled_from(["cuda", "cuda:0", "cuda:99", "tpu", "", "meta", 5, -1, 3.5, "cpu:5",
                                            "CPU", "mps", torch.device("meta"), ["cpu"], b"cpu", "auto ",
                                            "cuda:-1"]),
                           ANY_VALUE)
HOSTILE_BATCH = st.one_of(st.sampled_from([0, -1, 1.5, "2", None, 10**30, math.nan, [1]]), ANY_VALUE)

API_HOSTILE = {
    "method": st.one_of(st.sampled_from(["obs", "", None, 1, ["wanda"], "structured", "WANDA", b"wanda", {"m": 1}]),
                        ANY_VALUE),
    "sparsity": HOSTILE_FRACTION,
    "pattern": st.one_of(st.sampled_from(["2:3", "0:4", "4:4", "5:4", "2:0", "N:M", "", 24, 2.5, [2, 4], (2, 4),
                                          b"2:4", NMPattern(0, 4), NMPattern(5, 4), NMPattern(2, 0),
                                          NMPattern(-1, 4), NMPattern(2, 3), NMPattern(1.5, 4), NMPattern("2", "4"),
                                          "1:99999999999999999999", True, "unstructured ", "1:64"]),
                         st.tuples(st.integers(-3, 200), st.integers(-3, 200)).map(lambda t: f"{t[0]}:{t[1]}"),
                         ANY_VALUE),
    "calibration": st.sampled_from(HOSTILE_CALIBRATION),
    "device": HOSTILE_DEVICE,
    "batch_size": HOSTILE_BATCH,
    "options": st.sampled_from([{"blocksize": 0}, {"blocksize": -1}, {"blocksize": 1.5}, {"blocksize": "x"},
                                {"blocksize": None}, {"percdamp": math.nan}, {"percdamp": -1}, {"percdamp": 0},
                                {"percdamp": "x"}, {"percdamp": 10}, {"percdamp": math.inf}, {"frobnicate": 1},
                                {"blocksize": 10**30}, {"blocksize": True}]),
}


@st.composite
def api_cases(draw):
    n_bad = draw(st.sampled_from([0, 1, 1, 2]))
    bad = draw(st.lists(st.sampled_from(sorted(API_HOSTILE)), min_size=n_bad, max_size=n_bad, unique=True))
    method = draw(st.sampled_from(["magnitude", "wanda", "sparsegpt"]))
    if "options" in bad and draw(st.integers(0, 3)):
        method = "sparsegpt"
    pattern = draw(st.sampled_from([None, None, "unstructured", "2:4", NMPattern(4, 8), "1:4", " 4 : 8 "]))
    if pattern in (None, "unstructured"):
        sparsity = draw(st.one_of(st.none(), st.floats(0, 0.95), st.sampled_from([0, "0.5", Fraction(1, 4)])))
    else:
        nm = pattern if isinstance(pattern, NMPattern) else NMPattern(*map(int, pattern.split(":")))
        sparsity = draw(st.sampled_from([None, nm.n / nm.m]))
    case = {"method": method, "sparsity": sparsity, "pattern": pattern,
            "calibration": draw(st.sampled_from(VALID_CALIBRATION)),
            "device": draw(st.sampled_from([None, "cpu", torch.device("cpu"), "auto"])),
            "batch_size": draw(st.sampled_from([1, 2, 5])),
            "options": (draw(st.sampled_from([{}, {"blocksize": 8}, {"blocksize": 128, "percdamp": 0.5}]))
                        if method == "sparsegpt" else {})}
    for field in bad:
        case[field] = draw(API_HOSTILE[field])
    return case


def assert_one_line_refusal(error: UsageError) -> None:
    message = str(error)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


def assert_untouched(model, world) -> None:
    now = model.state_dict()
    assert now.keys() == world["state"].keys()
    for key, value in world["state"].items():
        assert now[key].shape == value.shape and torch.equal(now[key], value), key


@settings(max_examples=API_EXAMPLES, **SETTINGS)
@given(case=api_cases())
def test_api_prune_succeeds_or_refuses_with_usage_error(api_world, case):
    model = copy.deepcopy(api_world["model"])
    calibration = calibration_value(case["calibration"], api_world["calibration"])
    note(f"calibration = {case['calibration']}")
    try:
        report = llmprune.prune(model, calibration, method=case["method"], sparsity=case["sparsity"],
                                pattern=case["pattern"], device=case["device"], batch_size=case["batch_size"],
                                progress=False, **case["options"])
    except UsageError as error:
        note(f"refused: {error}")
        assert_one_line_refusal(error)
        assert_untouched(model, api_world)
    else:
        # The report describes this model: its sparsity is the share of zeros in the decoder's linear weights.
        weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert report.overall_sparsity == pytest.approx(zeros, abs=1e-9) and len(report.per_layer_sparsity) == 3
        assert 0 <= report.overall_sparsity < 1
        assert all(torch.isfinite(p).all() for p in model.parameters())


STRUCTURED_HOSTILE = {
    "heads": HOSTILE_FRACTION,
    "ffn": HOSTILE_FRACTION,
    "layers": st.one_of(st.sampled_from([-1, 3, 4, 1.5, "1", None, 10**30, [1], math.nan]), ANY_VALUE),
    "score": st.one_of(st.sampled_from(["", "FLAP", None, ["wanda"], 1, "wanda "]), ANY_VALUE),
    "allocation": st.one_of(st.sampled_from(["", None, ["uniform"], "Global"]), ANY_VALUE),
    "gqa": st.one_of(st.sampled_from(["", None, {}, "kv"]), ANY_VALUE),
    "round_to": st.one_of(st.sampled_from([0, -1, 1.5, "8", None, 1000, 10**30, 127]), ANY_VALUE),
    "round_heads_to": st.one_of(st.sampled_from([0, 3, -1, 1.5, "2", 4, 5]), ANY_VALUE),
    "calibration": st.sampled_from(HOSTILE_CALIBRATION),
    "device": HOSTILE_DEVICE,
    "batch_size": HOSTILE_BATCH,
}


@st.composite
def structured_cases(draw):
    n_bad = draw(st.sampled_from([0, 1, 1, 2]))
    bad = draw(st.lists(st.sampled_from(sorted(STRUCTURED_HOSTILE)), min_size=n_bad, max_size=n_bad, unique=True))
    case = {"heads": draw(st.sampled_from([0, 0.25, 0.5])), "ffn": draw(st.sampled_from([0, 0.1, 0.25, 0.5])),
            "layers": draw(st.sampled_from([0, 0, 1, 2])),
            "score": draw(st.sampled_from(["magnitude", "wanda", "flap"])),
            "allocation": draw(st.sampled_from(["uniform", "global"])),
            "gqa": draw(st.sampled_from(["groups", "queries"])),
            "round_to": draw(st.sampled_from([1, 8, 16])), "round_heads_to": draw(st.sampled_from([1, 2])),
            "calibration": draw(st.sampled_from(VALID_CALIBRATION)),
            "device": draw(st.sampled_from([None, "cpu", torch.device("cpu"), "auto"])),
            "batch_size": draw(st.sampled_from([1, 2, 5]))}
    if case["heads"] == case["ffn"] == case["layers"] == 0:
        case["heads"] = 0.5
    for field in bad:
        case[field] = draw(STRUCTURED_HOSTILE[field])
    return case


@settings(max_examples=STRUCTURED_API_EXAMPLES, **SETTINGS)
@given(case=structured_cases())
def test_api_prune_structured_succeeds_or_refuses_with_usage_error(api_world, case):
    model = copy.deepcopy(api_world["model"])
    sizes = model.config.to_dict()
    options = {k: v for k, v in case.items() if k != "calibration"}
    try:
        report = llmprune.prune_structured(model, calibration_value(case["calibration"], api_world["calibration"]),
                                           progress=False, **options)
    except UsageError as error:
        note(f"refused: {error}")
        assert_one_line_refusal(error)
        assert_untouched(model, api_world)
        assert model.config.to_dict() == sizes
    else:
        # The report describes this model: its parameter count after the cut is the model's own.
        assert report.parameters_after == sum(p.numel() for p in model.parameters())
        # FLAP's bias compensation may add o_proj/down_proj biases (hidden_size each per layer)
        added = sum(model.config.hidden_size * len(model.model.layers) for kind, on in
                    (report.bias_compensation or {}).items() if on)
        assert report.parameters_after <= report.parameters_before + added
        with torch.no_grad():
            logits = model(api_world["calibration"]).logits
        assert torch.isfinite(logits).all()
