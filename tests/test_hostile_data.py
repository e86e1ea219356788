"""Hostile data, recipes, evaluation requests and secrets: every one ends in one line.

Each class of input that once hung, exhausted memory, ran code without consent, printed a secret
or wrote invalid JSON is tried here through the command line in process (``llmprune.__main__.main``)
or, for the property-based cases, through the function that owns the check. Every refusal asserts
the exit code, exactly one line on stderr, no traceback, that nothing was created, and, where the
old behaviour was to hang, that it ends within a generous bound (a SIGALRM guard turns a hang into
a failure instead of a stuck suite).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmprune import data
from llmprune.__main__ import main
from llmprune.errors import UsageError

from conftest import write_text_sample

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # the shape of a Hugging Face access token


# ----------------------------------------------------------------------------- helpers


@contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging: an open() on a FIFO or an endless read is interrupted."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tree(root: Path) -> set[str]:
    """Every path under root (files, folders, links), relative: to see that nothing was created."""
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def refused(capsys, argv: list[str], *needles: str, code: int = 2, within: float = 30.0, workdir: Path | None = None):
    """Run the CLI; assert the exit code, one line on stderr holding every needle, no traceback,
    the time bound, and (with workdir) that no file appeared or vanished there. Returns the line."""
    capsys.readouterr()
    before = tree(workdir) if workdir is not None else None
    started = time.perf_counter()
    with deadline(within + 30):
        result = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert result == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert seconds < within, f"{seconds:.1f} s: {lines[0]}"
    if workdir is not None:
        assert tree(workdir) == before
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(model_folder):
    """A saved tiny Llama with tokenizer (a local HF folder)."""
    return model_folder


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_text_sample(tmp_path_factory.mktemp("sample") / "text.txt")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty current folder for one CLI run (a default output would land here)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def prune_argv(model_dir, calib, output, *extra) -> list[str]:
    return ["--model", str(model_dir), "--method", "wanda", "--calib-data", str(calib), "--eval-data", "none",
            "--nsamples", "2", "--seqlen", "16", "--output", str(output), "--no-progress", *extra]


def gzip_bomb(path: Path, expanded: int, unit: bytes) -> Path:
    """A .gz file of concatenated gzip members, each one 8 MiB of ``unit`` repeated: ``expanded``
    bytes once decompressed, a few MB on disk, written in well under a second."""
    chunk = unit * ((8 << 20) // len(unit))
    member = gzip.compress(chunk, compresslevel=9)
    with open(path, "wb") as handle:
        for _ in range(expanded // len(chunk) + 1):
            handle.write(member)
    return path


# ----------------------------------------------------------------------------- data files: kinds


def test_fifo_in_calibration_folder_is_refused_at_once(model_dir, sample, work, capsys, monkeypatch):
    folder = work / "calib"
    folder.mkdir()
    shutil.copy(sample, folder / "a.txt")
    os.mkfifo(folder / "b.txt")  # nobody ever writes to it: an open() without O_NONBLOCK waits forever
    refused(capsys, prune_argv(model_dir, folder, work / "out"), "b.txt", "FIFO", "regular file",
            within=30, workdir=work)
    # checked with the other flags, before the model is loaded: a big model would take minutes
    import llmprune.models.loading

    monkeypatch.setattr(llmprune.models.loading, "load_model",
                        lambda *a, **k: pytest.fail("loaded before the data check"))
    refused(capsys, prune_argv(model_dir, folder, work / "out"), "b.txt", "FIFO", within=30, workdir=work)


def test_symlink_to_dev_zero_is_refused(model_dir, sample, work, capsys):
    folder = work / "calib"
    folder.mkdir()
    shutil.copy(sample, folder / "a.txt")
    os.symlink("/dev/zero", folder / "zero.txt")  # read whole, it never ends
    refused(capsys, prune_argv(model_dir, folder, work / "out"), "zero.txt", "/dev/zero", "character device",
            within=30, workdir=work)


KINDS = ["text", "subfolder", "fifo", "dev_zero", "dev_null", "dangling", "socket", "hidden_fifo", "other_suffix_fifo"]
BAD_KINDS = {"fifo", "dev_zero", "dev_null", "dangling", "socket"}


def _make(folder: Path, index: int, kind: str) -> str | None:
    """Create one entry of the given kind; returns the relative path the reader sees (None: skipped)."""
    name = f"{index}-{kind}.txt"
    if kind == "text":
        (folder / name).write_text(f"document {index} with some words in it\n")
    elif kind == "subfolder":
        (folder / f"sub{index}").mkdir()
        (folder / f"sub{index}" / "t.txt").write_text(f"nested document {index}\n")
        return f"sub{index}/t.txt"
    elif kind == "fifo":
        os.mkfifo(folder / name)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", folder / name)
    elif kind == "dev_null":
        os.symlink("/dev/null", folder / name)
    elif kind == "dangling":
        os.symlink(folder / "nowhere", folder / name)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(folder / name))
        server.close()  # the socket file stays
    elif kind == "hidden_fifo":
        os.mkfifo(folder / f".{index}.txt")  # names starting with "." are skipped, never opened
        return None
    elif kind == "other_suffix_fifo":
        os.mkfifo(folder / f"{index}.pipe")  # not a data suffix: skipped, never opened
        return None
    return name


@settings(max_examples=40, **SETTINGS)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=5))
@example(kinds=["text", "fifo"])
@example(kinds=["dev_zero"])
@example(kinds=["hidden_fifo", "text"])
def test_random_file_kinds_in_a_data_folder(kinds):
    """Only regular files are read: any other entry with a data suffix is refused (one line naming
    the first such file), skipped names are never opened, and regular files read as usual."""
    with tempfile.TemporaryDirectory(prefix="h12-") as root:  # short: socket paths have a length limit
        folder = Path(root)
        seen = {}
        for index, kind in enumerate(kinds):
            name = _make(folder, index, kind)
            if name is not None:
                seen[name] = kind
        bad = sorted(name for name, kind in seen.items() if kind in BAD_KINDS)
        with deadline(20):
            if bad:
                with pytest.raises(UsageError) as refusal:
                    data.load_texts([str(folder)], "calibration")
                message = str(refusal.value)
                assert len(message.splitlines()) == 1 and bad[0] in message, message
            elif seen:
                docs = data.load_texts([str(folder)], "calibration")
                assert len(docs) == len(seen)
            else:
                with pytest.raises(UsageError, match="holds no"):
                    data.load_texts([str(folder)], "calibration")


# ----------------------------------------------------------------------------- data files: sizes


@pytest.fixture(scope="module")
def text_bomb(tmp_path_factory):
    """About 13 MB of .txt.gz that expands to 5 GiB of ordinary text."""
    return gzip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.txt.gz", 5 << 30,
                     b"all work and no play makes a dull day\n")


def test_gzip_bomb_of_text_is_refused_within_seconds(model_dir, text_bomb, work, capsys):
    """With the default cap (2 GiB after decompression): counted without being kept, then refused."""
    assert text_bomb.stat().st_size < 20 << 20
    line = refused(capsys, prune_argv(model_dir, text_bomb, work / "out"), "bomb.txt.gz", "--max-data-bytes",
                   within=30, workdir=work)
    assert str(data.DEFAULT_MAX_DATA_BYTES) in line


def test_gzip_bomb_of_zeros_is_refused_at_the_first_chunk(model_dir, tmp_path, work, capsys):
    bomb = gzip_bomb(tmp_path / "zeros.txt.gz", 5 << 30, bytes(1024))
    refused(capsys, ["eval", str(model_dir), "--data", str(bomb), "--seqlen", "16", "--no-progress"],
            "zeros.txt.gz", "NUL", within=10, workdir=work)


@pytest.mark.parametrize("command", ["prune", "eval", "sweep", "recipe"])
def test_max_data_bytes_caps_every_command(command, model_dir, sample, work, capsys):
    """The cap is counted after decompression over all local files of a part; each command takes it."""
    def argv(cap: str) -> list[str]:
        return {"prune": prune_argv(model_dir, sample, work / "out", "--max-data-bytes", cap),
                "eval": ["eval", str(model_dir), "--data", str(sample), "--seqlen", "16", "--max-data-bytes", cap],
                "sweep": ["sweep", "--model", str(model_dir), "--methods", "wanda", "--sparsities", "0.5",
                          "--calib-data", str(sample), "--eval-data", str(sample), "--nsamples", "2", "--seqlen", "16",
                          "--eval-seqlen", "16", "--output", str(work / "sweep"), "--max-data-bytes", cap,
                          "--no-progress"],
                "recipe": ["--recipe", str(recipe_file(work.parent, VALID_RECIPE.format(model=model_dir, calib=sample)
                                                       .replace("magnitude", "wanda") + f"max_data_bytes: {cap}\n")),
                           "--output", str(work / "out")]}[command]

    refused(capsys, argv("1000"), "text.txt", "--max-data-bytes 1000", workdir=work)
    refused(capsys, argv("0"), "--max-data-bytes must be an integer >= 1", workdir=work)


def test_max_data_bytes_counts_all_files_together(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("x " * 400)  # 800 bytes each
    assert len(data.load_texts([str(tmp_path)], "calibration", max_bytes=2400)) == 3
    with pytest.raises(UsageError, match="2.txt"):
        data.load_texts([str(tmp_path)], "calibration", max_bytes=2399)
    with data.max_data_bytes(2399), pytest.raises(UsageError, match="--max-data-bytes 2399"):
        data.load_texts([str(tmp_path)], "evaluation")
    assert len(data.load_texts([str(tmp_path)], "evaluation")) == 3  # the block's cap is gone again


def test_parquet_dictionary_bomb_is_refused_before_its_strings_are_made(tmp_path):
    """One 1 MB value referenced 20 000 times through a dictionary: 20 GB decoded, 1 MB stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.DictionaryArray.from_arrays(pa.array([0] * 20_000, pa.int32()), pa.array(["word " * 200_000]))
    pq.write_table(pa.table({"text": column}), tmp_path / "bomb.parquet", compression="zstd")
    assert (tmp_path / "bomb.parquet").stat().st_size < 2 << 20
    with deadline(30), pytest.raises(UsageError, match="bomb.parquet.*--max-data-bytes"):
        data.load_texts([str(tmp_path / "bomb.parquet")], "calibration")
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": pa.DictionaryArray.from_arrays(pa.array([0, 0, 0], pa.int32()),
                                                                    pa.array(["a few words"]))}), small)
    assert data.load_texts([str(small)], "calibration") == ["a few words"] * 3


def test_text_without_white_space_is_refused_not_tokenised(model_dir, tmp_path, work, capsys):
    """3 MB with no place to cut: refused in one line instead of one tokenizer call that, at
    hundreds of megabytes, aborts the process inside Rust."""
    blob = tmp_path / "blob.txt"
    blob.write_text("x" * (3 << 20))
    refused(capsys, prune_argv(model_dir, blob, work / "out"), "blob.txt", "cannot be cut", within=30, workdir=work)
    refused(capsys, ["eval", str(model_dir), "--data", str(blob), "--seqlen", "16", "--no-progress"],
            "evaluation text", "cannot be cut", within=30, workdir=work)


WORD = st.sampled_from(["the", "quiet", "river", "Emma", "walked", "home", "again"])
BARE = st.integers(1, 1500).map(lambda n: "x" * n)


@settings(max_examples=30, **SETTINGS)
@given(parts=st.lists(st.one_of(WORD, WORD, BARE), min_size=1, max_size=40))
def test_encode_in_pieces_is_exact_or_refuses_an_uncuttable_stretch(tokenizer, parts):
    """Random text of words and runs without white space, cut with 64-character windows and a
    512-character limit: the ids equal one call's, unless a long bare run was refused; runs far
    below the limit are never refused, runs far above it always are."""
    text = " ".join(parts)
    longest = max(len(p) for p in parts)
    try:
        ids = data._encode(tokenizer, text, chunk_chars=64, max_uncut_chars=512)
    except UsageError as error:
        assert longest > 512 - 64, (longest, str(error))
        assert "cannot be cut" in str(error) and len(str(error).splitlines()) == 1
        return
    one_call = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == one_call
    assert longest <= 512 + 6 * 64  # a run this long always holds nine windows with no place to cut


# ----------------------------------------------------------------------------- recipes


def recipe_file(folder: Path, body: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(body)
    return path


VALID_RECIPE = ("name: hostile\nmodel: {model}\ncalib_data: [{calib}]\neval_data: none\nnsamples: 2\nseqlen: 16\n"
                "stages:\n  - {{method: magnitude, sparsity: 0.5}}\n")


@pytest.mark.parametrize("key", ["overwrite", "trust_remote_code"])
def test_recipe_may_not_grant_consent(key, model_dir, sample, work, capsys):
    recipe = recipe_file(work.parent, VALID_RECIPE.format(model=model_dir, calib=sample) + f"{key}: true\n")
    refused(capsys, ["--recipe", str(recipe), "--output", str(work / "out")], str(recipe), key,
            f"--{key.replace('_', '-')} on the command line", within=10, workdir=work)


def test_overwrite_on_the_command_line_still_works_with_a_recipe(model_dir, sample, work, capsys):
    recipe = recipe_file(work.parent, VALID_RECIPE.format(model=model_dir, calib=sample))
    out = work / "out"
    assert main(["--recipe", str(recipe), "--output", str(out), "--no-progress"]) == 0
    refused(capsys, ["--recipe", str(recipe), "--output", str(out), "--no-progress"], "--overwrite")
    assert main(["--recipe", str(recipe), "--output", str(out), "--overwrite", "--no-progress"]) == 0
    saved = (out / "recipe.yaml").read_text()
    assert "overwrite=True" in saved  # named in the header as a command-line override ...
    assert "\noverwrite:" not in saved  # ... but not a field: the saved recipe reruns without granting it


BILLION_LAUGHS = """\
model: /no/such/model
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
calib_data: *i
stages:
  - {method: wanda}
"""


def test_alias_bomb_recipe_ends_at_once(work, capsys):
    recipe = recipe_file(work.parent, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 700
    refused(capsys, ["--recipe", str(recipe)], str(recipe), "aliases", within=10, workdir=work)


@pytest.mark.parametrize("body, needle", [
    ("model: x\nstages: " + "[" * 20_000 + "]" * 20_000 + "\n", "r.yaml"),  # nesting past the recursion limit
    ("model: x\nnsamples: [" + ", ".join(["12345678"] * 20_000) + "]\nstages:\n  - {method: wanda}\n", "nsamples"),
    ("model: x\ndescription: '" + "y" * (2 << 20) + "'\nstages:\n  - {method: wanda}\n", "larger than"),
    (f"model: x\n{TOKEN}: 1\nstages:\n  - {{method: wanda}}\n", "unknown key"),
])
def test_recipe_errors_are_bounded(body, needle, work, capsys):
    recipe = recipe_file(work.parent, body)
    line = refused(capsys, ["--recipe", str(recipe)], needle, within=20, workdir=work)
    assert len(line) < 800 and TOKEN not in line


def test_recipe_that_is_a_fifo_is_refused(work, capsys):
    os.mkfifo(work.parent / "fifo.yaml")
    refused(capsys, ["--recipe", str(work.parent / "fifo.yaml")], "fifo.yaml", "FIFO", within=10, workdir=work)


YAML_BITS = ["&a ", "*a", "[", "]", "{", "}", ": ", "- ", "\n  ", "\n", "!!python/object/apply:os.system ['true']",
             "<<: *a", "'", '"', "\t", "~", "1e999", "-.inf", "? ", "!!binary ", "%YAML 1.1\n", "&b [*a, *a]", ","]


@settings(max_examples=60, **SETTINGS)
@given(edits=st.lists(st.tuples(st.sampled_from(["insert", "delete", "repeat"]), st.floats(0, 1),
                                st.sampled_from(YAML_BITS), st.integers(1, 40)), min_size=1, max_size=4))
def test_mutated_recipes_end_in_one_line(edits, tmp_path_factory, capsys):
    """Random edits of a valid recipe (whose model does not exist): always exit 2 with one line,
    no traceback, nothing created, within seconds; aliases and Python tags never take effect."""
    body = VALID_RECIPE.format(model="/no/such/model", calib="default")
    for operation, where, bit, length in edits:
        at = int(where * len(body))
        if operation == "insert":
            body = body[:at] + bit + body[at:]
        elif operation == "delete":
            body = body[:at] + body[at + length:]
        else:
            body = body[:at] + body[at:at + length] * 3 + body[at:]
    folder = tmp_path_factory.mktemp("mutated")
    recipe = recipe_file(folder, body)
    refused(capsys, ["--recipe", str(recipe), "--output", str(folder / "out")], within=20, workdir=folder)


# ----------------------------------------------------------------------------- eval


def _function_task(folder: Path, marker: Path) -> None:
    """A local lm_eval task whose YAML names Python in the folder (!function): importing it writes marker."""
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n\n"
                                     "def docs(dataset):\n    return dataset\n")
    (folder / "evil.yaml").write_text("task: evil\ndataset_path: json\ntest_split: test\n"
                                      "process_docs: !function utils.docs\noutput_type: multiple_choice\n"
                                      "doc_to_text: q\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")


def test_include_path_needs_trust_remote_code(model_dir, tmp_path, work, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    marker = tmp_path / "ran.txt"
    _function_task(tasks, marker)
    refused(capsys, ["eval", str(model_dir), "--data", "none", "--tasks", "evil", "--include-path", str(tasks)],
            "--include-path", "--trust-remote-code", within=10, workdir=work)
    assert not marker.exists()
    refused(capsys, ["eval", str(model_dir), "--data", "none", "--tasks", "evil", "--include-path",
                     str(tmp_path / "missing"), "--trust-remote-code"], "not a folder", within=10, workdir=work)


@pytest.fixture
def broken_model(tmp_path, tokenizer):
    """Build a tiny Llama folder with one weight changed by ``damage(weight)``."""
    from conftest import tiny_model

    def build(damage):
        model = tiny_model("llama")
        with torch.no_grad():
            damage(model.model.layers[1].mlp)
        folder = tmp_path / "broken"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return build


def test_eval_of_nan_weights_exits_1_naming_the_layer(broken_model, sample, work, capsys):
    folder = broken_model(lambda mlp: mlp.down_proj.weight.__setitem__((0, 0), float("nan")))
    report = work / "r.json"
    refused(capsys, ["eval", str(folder), "--data", str(sample), "--seqlen", "32", "--tokens", "64",
                     "--json", str(report), "--no-progress"],
            "numerical failure", "model.layers.1.mlp.down_proj", code=1, workdir=work)


def test_eval_of_overflowing_activations_exits_1_naming_the_module(broken_model, sample, work, capsys):
    """Finite weights whose outputs overflow float32: found by running the window with hooks."""
    def overflow(mlp):
        mlp.up_proj.weight.fill_(1e38)
        mlp.down_proj.weight.fill_(1e38)

    folder = broken_model(overflow)
    refused(capsys, ["eval", str(folder), "--data", str(sample), "--seqlen", "32", "--tokens", "64",
                     "--json", str(work / "r.json"), "--no-progress"],
            "numerical failure", "model.layers.1.mlp", "perplexity window 0", code=1, workdir=work)


def test_eval_json_is_strict_json(model_dir, sample, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", str(model_dir), "--data", str(sample), "--seqlen", "32", "--tokens", "64",
                 "--json", str(out), "--no-progress"]) == 0

    def no_constants(name):
        raise AssertionError(f"bare {name} in the report")
    assert json.loads(out.read_text(), parse_constant=no_constants)["perplexity"]["perplexity"] > 1
    from llmprune.jsonreport import report_json

    assert json.loads(report_json({"ppl": float("inf"), "x": [float("nan"), 1.0]}), parse_constant=no_constants) \
        == {"ppl": None, "x": [None, 1.0]}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Measuring anything needs the model: loading it before the checks is a failure of the test."""
    import llmprune.models.loading

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")
    monkeypatch.setattr(llmprune.models.loading, "load_model", forbidden)


def test_tasks_whose_data_cannot_be_had_are_refused_before_measuring(model_dir, sample, work, capsys, monkeypatch,
                                                                       no_model_loading):
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)  # as on an offline machine, deterministically
    report = work / "r.json"
    refused(capsys, ["eval", str(model_dir), "--data", str(sample), "--tasks", "hellaswag,arc_easy",
                     "--json", str(report), "--no-progress"], "hellaswag", "cannot be had", within=90, workdir=work)


@pytest.mark.parametrize("target, needle", [("nodir/r.json", "does not exist"), (".", "is a folder")])
def test_eval_json_path_is_checked_first(target, needle, model_dir, sample, work, capsys, no_model_loading):
    refused(capsys, ["eval", str(model_dir), "--data", str(sample), "--json", target], "--json", needle,
            within=10, workdir=work)


# ----------------------------------------------------------------------------- secrets


@settings(max_examples=15, **SETTINGS)
@given(secret=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=30, max_size=40),
       layout=st.sampled_from(["{t} me/model", "me/model {t}", "me/{t}!", "https://huggingface.co/{t}"]))
def test_token_pasted_into_push_to_hub_is_never_printed(secret, layout, model_dir, sample, tmp_path_factory, capsys):
    """Repository ids that the Hub refuses: checked before any work, the token never printed."""
    folder = tmp_path_factory.mktemp("push")
    argv = prune_argv(model_dir, sample, folder / "out", "--push-to-hub", layout.format(t="hf_" + secret))
    line = refused(capsys, argv, "--push-to-hub", "hf_***", within=20, workdir=folder)
    assert secret not in line


def test_token_in_a_valid_repo_id_is_not_printed_when_publishing_fails(model_dir, sample, work, capsys, monkeypatch):
    """A valid id that holds a token: the run completes, publishing fails (no credentials here), and
    the one error line names the repository without the token."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    line = refused(capsys, prune_argv(model_dir, sample, work / "out", "--push-to-hub", f"me/{TOKEN}"),
                   "cannot publish", "me/hf_***", code=1)
    assert TOKEN not in line


def test_every_error_line_is_redacted(work, capsys, monkeypatch):
    """Redaction is where errors are printed, whatever raised them."""
    recipe = recipe_file(work.parent, f"model: x\nstages: [{{method: wanda, sparsity: {TOKEN}}}]\n")
    line = refused(capsys, ["--recipe", str(recipe)], "hf_***", workdir=work)
    assert TOKEN not in line
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123")
    line = refused(capsys, ["eval", "/no/such/s3cr3t-value-123/model", "--data", "none", "--speed"], workdir=work)
    assert "s3cr3t-value-123" not in line
