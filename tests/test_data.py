"""Tests for llmprune.data: local files, presets (with a fake Hub), the default corpus, windows."""

import gzip
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune import data
from llmprune.errors import UsageError

AUSTEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen"
needs_austen = pytest.mark.skipif(not AUSTEN.is_dir(), reason="shared Austen texts not present")

SAMPLE = (
    "It was a truth universally acknowledged, that a single man in possession of a good fortune "
    "must be in want of a wife. def window(ids, start): return ids[start:start + 8]\n"
) * 50


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok(bos_tokenizer):
    """A small real byte-level BPE tokenizer (conftest) that adds BOS when asked: data must not ask."""
    return bos_tokenizer


def test_tokenizer_fixture_adds_bos_when_asked(tok):
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok.bos_token_id not in tok("hello", add_special_tokens=False)["input_ids"]


def encode(tokenizer, text):
    """[T] reference ids: one call, no special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def is_slice_of(row, full):
    """True when row [L] occurs contiguously in full [T]."""
    return bool((full.unfold(0, row.numel(), 1) == row).all(dim=1).any())


def usage_error(fn, *needles):
    """Call fn, expect a one-line UsageError containing every needle; return the message."""
    with pytest.raises(UsageError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------- tokenising in pieces


def test_long_text_is_tokenised_in_pieces_with_the_ids_of_one_call(tok, monkeypatch):
    """Cut only where cutting changes nothing: the ids equal one call's, bit for bit, and the
    tokeniser never sees a piece much longer than chunk_chars."""
    no_cut = "-" * 9000  # nowhere to cut: joins the piece before it
    text = SAMPLE * 8 + "\n\n  Numbers 12345 and   spaces\n\n" + no_cut + SAMPLE.replace(" ", "\n") * 4
    seen = []
    real = data._encode_piece
    monkeypatch.setattr(data, "_encode_piece", lambda t, piece: seen.append(len(piece)) or real(t, piece))
    ids = data._encode(tok, text, chunk_chars=2000)
    assert torch.equal(ids, encode(tok, text))
    pieces = [n for n in seen if n > 512]  # the 512-character checks aside
    assert sum(pieces) == len(text)
    assert len(pieces) >= (len(text) - len(no_cut)) // 4000
    assert max(pieces) <= 4000 + len(no_cut) and sorted(pieces)[-2] <= 4000


def test_tokeniser_that_cannot_be_cut_is_called_once():
    """Llama-2-style normalisation prepends a word marker to every call, so a piece starting with
    " was" gains a token: the check refuses every cut and the text goes through one call."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "▁": 1, "▁It": 2, "▁was": 3, "▁a": 4, "▁truth": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    prepending = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert encode(prepending, " was").tolist() == [1, 3]  # the extra marker a cut would add
    text = "It was a truth " * 2000
    assert data._safe_cut(prepending, text, 2000, 4000) is None
    assert torch.equal(data._encode(prepending, text, chunk_chars=2000), encode(prepending, text))


@needs_austen
@pytest.mark.slow
def test_novel_tokenised_in_pieces_equals_one_call(smollm2_folder):
    """The real tokeniser (SmolLM2's byte-level BPE) on a whole novel."""
    from transformers import AutoTokenizer

    smollm2_tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    with gzip.open(AUSTEN / "persuasion.txt.gz", "rt", encoding="utf-8") as handle:
        text = handle.read()
    assert torch.equal(data._encode(smollm2_tokenizer, text, chunk_chars=1 << 14), encode(smollm2_tokenizer, text))


# ----------------------------------------------------------------------------- local files


def test_txt_and_txt_gz_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffplain text\nline two\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("gzipped text – with ünïcode")
    assert data.load_texts([str(tmp_path / "a.txt")], "calibration") == ["plain text\nline two\n"]
    assert data.load_texts([str(tmp_path / "b.txt.gz")], "evaluation") == ["gzipped text – with ünïcode"]


@needs_austen
def test_real_gzipped_novel_reads_whole():
    path = AUSTEN / "persuasion.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        expected = fh.read()
    assert data.load_texts([str(path)], "evaluation") == [expected.removeprefix("\ufeff")]


def test_jsonl_and_jsonl_gz(tmp_path):
    records = [{"text": "first doc", "id": 1}, {"text": "second\u2028still second"}, {"text": ""}]
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n  \n")  # blank lines skipped
    write_jsonl(tmp_path / "b.jsonl.gz", records[:1], opener=gzip.open)
    # U+2028 is inside a JSON string and must not split the record.
    texts = data.load_texts([str(tmp_path / "a.jsonl")], "calibration")
    assert texts == ["first doc", "second\u2028still second", ""]
    assert data.load_texts([str(tmp_path / "b.jsonl.gz")], "calibration") == ["first doc"]


def test_parquet_text_column(tmp_path):
    table = pa.table({"text": ["row one", None, "row three"], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert data.load_texts([str(tmp_path / "t.parquet")], "evaluation") == ["row one", "row three"]


def test_folder_is_recursive_sorted_and_skips_others(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("b/z")
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "b/c 1"}, {"text": "b/c 2"}])
    with gzip.open(tmp_path / "a0.txt.gz", "wt") as fh:
        fh.write("a0")
    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "b" / "p.parquet")
    (tmp_path / "notes.csv").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    texts = data.load_texts([str(tmp_path)], "calibration")
    # Sorted by relative path: a.txt, a0.txt.gz, b/c.jsonl, b/p.parquet, b/z.txt.
    assert texts == ["a", "a0", "b/c 1", "b/c 2", "p", "b/z"]
    assert data.load_texts([str(tmp_path)], "evaluation") == texts  # local files serve both parts


def test_sources_combine_in_order_and_string_is_one_source(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    x, y = str(tmp_path / "x.txt"), str(tmp_path / "y.txt")
    assert data.load_texts([y, x, y], "calibration") == ["y", "x", "y"]
    assert data.load_texts(x, "calibration") == ["x"]
    assert data.load_texts([tmp_path / "x.txt"], "calibration") == ["x"]  # a Path works too


# ----------------------------------------------------------------------------- calibration windows


@pytest.fixture
def novel(tmp_path):
    """A ~30k-character text file and its reference token ids."""
    path = tmp_path / "novel.txt"
    text = SAMPLE
    if AUSTEN.is_dir():
        with gzip.open(AUSTEN / "emma.txt.gz", "rt", encoding="utf-8") as fh:
            text = fh.read(30_000)
    path.write_text(text, encoding="utf-8")
    return str(path), text


def test_calibration_shape_dtype_and_seed(tok, novel):
    path, _ = novel
    a = data.calibration_ids(tok, [path], nsamples=6, seqlen=64, seed=0)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_ids(tok, [path], 6, 64, 0))
    assert not torch.equal(a, data.calibration_ids(tok, [path], 6, 64, 1))
    assert len({tuple(r.tolist()) for r in a}) > 1  # not one window repeated


def test_windows_are_contiguous_slices_of_the_joined_text(tok, tmp_path, novel):
    path, text = novel
    (tmp_path / "second.txt").write_text("A second document, short.")
    sources = [path, str(tmp_path / "second.txt")]
    full = encode(tok, text + "\n\n" + "A second document, short.")  # joined with "\n\n", tokenised once
    windows = data.calibration_ids(tok, sources, nsamples=20, seqlen=32, seed=3)
    assert all(is_slice_of(row, full) for row in windows)
    # No special tokens were added.
    assert tok.bos_token_id not in windows and tok.eos_token_id not in windows


def test_exactly_one_window_fits(tok, tmp_path):
    (tmp_path / "s.txt").write_text("exactly as long as one window")
    full = encode(tok, "exactly as long as one window")
    windows = data.calibration_ids(tok, [str(tmp_path / "s.txt")], nsamples=3, seqlen=full.numel(), seed=0)
    assert torch.equal(windows, full.expand(3, -1))


@pytest.fixture(scope="module")
def source_txt(tmp_path_factory):
    """This test file's source as a .txt file: code and prose, ~20k characters."""
    path = tmp_path_factory.mktemp("src") / "source.txt"
    path.write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    return path


@settings(max_examples=15, deadline=None)
@given(nsamples=st.integers(1, 5), seqlen=st.integers(2, 40), seed=st.integers(0, 2**32))
def test_windows_property(tok, source_txt, nsamples, seqlen, seed):
    windows = data.calibration_ids(tok, [str(source_txt)], nsamples, seqlen, seed)
    full = encode(tok, source_txt.read_text(encoding="utf-8"))
    assert windows.shape == (nsamples, seqlen)
    assert all(is_slice_of(row, full) for row in windows)


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_joins_once_and_truncates(tok, tmp_path):
    write_jsonl(tmp_path / "e.jsonl", [{"text": "Emma Woodhouse, handsome"}, {"text": "clever, and rich"}])
    ids = data.evaluation_ids(tok, [str(tmp_path / "e.jsonl")], None)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert torch.equal(ids, encode(tok, "Emma Woodhouse, handsome\n\nclever, and rich"))
    assert torch.equal(data.evaluation_ids(tok, [str(tmp_path / "e.jsonl")], 5), ids[:5])
    assert torch.equal(data.evaluation_ids(tok, [str(tmp_path / "e.jsonl")], 10**6), ids)


# ----------------------------------------------------------------------------- default corpus


def test_default_corpus_parts_are_disjoint_and_large():
    cal = data.load_texts(None, "calibration")
    ev = data.load_texts(None, "evaluation")
    assert cal and ev and all(d.strip() for d in cal + ev)
    assert not set(cal) & set(ev)
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)
    # Real tokenizers give <= 4 characters per token on this text (SmolLM2: 3.9), so this many
    # characters means >= 128 x 2048 calibration tokens and >= 64k evaluation tokens.
    assert sum(map(len, cal)) >= 4 * 128 * 2048
    assert sum(map(len, ev)) >= 4 * 65536
    # None, [] and ["default"] are the same corpus; results are fresh lists (the cache is safe).
    assert data.load_texts([], "calibration") == cal == data.load_texts(["default"], "calibration")
    cal.clear()
    assert data.load_texts(None, "calibration")


def test_default_corpus_skips_tests_and_site_packages():
    paths = [rel for _, rel, _ in data._stdlib_documents()]
    assert paths == sorted(paths) and len(paths) > 100
    for rel in paths:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), rel
        assert rel.endswith(".py") and not parts[-1].startswith("test_")
    docs = dict((rel, doc) for _, rel, doc in data._stdlib_documents())
    # A known docstring, extracted without importing the module.
    assert "Heap queue algorithm" in docs["heapq.py"]


def test_default_corpus_tokens(tok):
    windows = data.calibration_ids(tok, None, nsamples=8, seqlen=2048, seed=0)
    assert windows.shape == (8, 2048)
    assert torch.equal(windows, data.calibration_ids(tok, [], 8, 2048, 0))
    assert data.evaluation_ids(tok, None, None).numel() >= 65536


# ----------------------------------------------------------------------------- presets (fake Hub)

FIELD = {"wikitext": "text", "allenai/c4": "text", "ptb_text_only": "sentence"}


class FakeHub:
    """Stands in for datasets.load_dataset: records calls, returns a small in-memory Dataset."""

    def __init__(self, rows=None):
        self.calls = []
        self.rows = rows

    def __call__(self, path, name=None, *, data_files=None, split=None, **kwargs):
        import datasets

        self.calls.append(
            dict(path=path, name=name, data_files=data_files, split=split, **kwargs,
                 offline=datasets.config.HF_HUB_OFFLINE)
        )
        rows = self.rows if self.rows is not None else [f"{path} {split} row {i}" for i in range(4)]
        return datasets.Dataset.from_dict({FIELD[path]: rows})


@pytest.fixture
def hub(monkeypatch):
    """A FakeHub installed as datasets.load_dataset, with the Hub probed as unreachable."""
    import datasets

    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    _start_online(monkeypatch)
    return fake


def _start_online(monkeypatch):
    """Online to start with, whatever an earlier test imported under HF_HUB_OFFLINE=1 (the flags
    are read once at import): the tests check what the preset loader sets and undoes."""
    import datasets
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


EXPECTED = {
    ("wikitext2", "calibration"): ("wikitext", "wikitext-2-raw-v1", None, "train"),
    ("wikitext2", "evaluation"): ("wikitext", "wikitext-2-raw-v1", None, "test"),
    ("c4", "calibration"): ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}, "train"),
    ("c4", "evaluation"): (
        "allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation"
    ),
    ("ptb", "calibration"): ("ptb_text_only", "penn_treebank", None, "train"),
    ("ptb", "evaluation"): ("ptb_text_only", "penn_treebank", None, "test"),
}


@pytest.mark.parametrize("preset,part", sorted(EXPECTED))
def test_preset_arguments(hub, preset, part):
    path, name, data_files, split = EXPECTED[(preset, part)]
    texts = data.load_texts([preset], part)
    assert hub.calls == [dict(path=path, name=name, data_files=data_files, split=split, offline=True)]
    assert texts == [f"{path} {split} row {i}" for i in range(4)]
    import datasets

    assert datasets.config.HF_HUB_OFFLINE is False  # the forced offline mode was undone


def test_preset_reachable_hub_is_not_forced_offline(monkeypatch):
    import datasets

    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    _start_online(monkeypatch)
    data.load_texts(["wikitext2"], "evaluation")
    assert fake.calls[0]["offline"] is False


def test_presets_table_is_complete():
    assert set(data.PRESETS) == {"wikitext2", "c4", "ptb"}
    for spec in data.PRESETS.values():
        assert spec["description"] and spec["field"]


def test_wikitext_calibration_joins_rows_with_space(tok, hub):
    hub.rows = [r for i in range(3) for r in (f" = Heading {i} = \n", "", f" Body of article {i} with words . \n")]
    windows = data.calibration_ids(tok, ["wikitext2"], nsamples=10, seqlen=12, seed=0)
    full = encode(tok, " ".join(hub.rows))  # the papers' calibration joiner
    assert all(is_slice_of(row, full) for row in windows)
    ev = data.evaluation_ids(tok, ["wikitext2"], None)
    assert torch.equal(ev, encode(tok, "\n\n".join(hub.rows)))


def test_c4_calibration_samples_long_documents(tok, hub):
    long_docs = [f"Long document number {i}: " + "words and more words, " * 40 for i in range(3)]
    hub.rows = ["short", "tiny doc", *long_docs, "also short"]
    seqlen = 50
    windows = data.calibration_ids(tok, ["c4"], nsamples=12, seqlen=seqlen, seed=5)
    assert windows.shape == (12, seqlen)
    encoded = [encode(tok, d) for d in long_docs]
    # Every window lies inside one long document; short documents are never used.
    assert all(any(is_slice_of(row, e) for e in encoded) for row in windows)
    assert torch.equal(windows, data.calibration_ids(tok, ["c4"], 12, seqlen, 5))
    assert not torch.equal(windows, data.calibration_ids(tok, ["c4"], 12, seqlen, 6))
    # Never tokenises the whole shard: only "calibration" is loaded, through load_dataset.
    assert {c["split"] for c in hub.calls} == {"train"}


def test_c4_evaluation_keeps_first_1100_documents(hub):
    hub.rows = [f"doc {i}" for i in range(1200)]
    assert data.load_texts(["c4"], "evaluation") == [f"doc {i}" for i in range(1100)]


def test_c4_calibration_without_long_documents_fails(tok, hub, monkeypatch):
    hub.rows = ["short"] * 5
    monkeypatch.setattr(data, "_MIN_DRAWS", 50)
    usage_error(lambda: data.calibration_ids(tok, ["c4"], 2, 64, 0), "'c4'", "seqlen=64")


def test_c4_cannot_mix_with_other_sources(tok, hub, novel):
    usage_error(lambda: data.calibration_ids(tok, ["c4", novel[0]], 2, 8, 0), "'c4'", "combined")


def test_preset_failure_becomes_usage_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    usage_error(lambda: data.load_texts(["wikitext2"], "calibration"), "'wikitext2'", "'wikitext'", "Hub")


def test_user_offline_mode_is_respected(monkeypatch):
    import datasets

    def cache_miss(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ptb_text_only' on the Hub (OfflineModeIsEnabled)")

    def no_probe():
        raise AssertionError("the Hub must not be probed in offline mode")

    monkeypatch.setattr(datasets, "load_dataset", cache_miss)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(data, "_hub_reachable", no_probe)
    usage_error(lambda: data.load_texts(["ptb"], "calibration"), "'ptb'", "HF_HUB_OFFLINE")


def test_real_offline_failure_is_fast(monkeypatch, tmp_path):
    """The real load_dataset, Hub unreachable, empty cache: a UsageError within seconds."""
    import datasets

    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    _start_online(monkeypatch)
    for preset in ("wikitext2", "c4", "ptb"):
        start = time.monotonic()
        usage_error(lambda preset=preset: data.load_texts([preset], "evaluation"), f"'{preset}'",
                    "local datasets cache")
        assert time.monotonic() - start < 10
    assert datasets.config.HF_HUB_OFFLINE is False


# ----------------------------------------------------------------------------- errors


def test_bad_arguments(tok, novel):
    path = novel[0]
    usage_error(lambda: data.calibration_ids(tok, [path], 0, 8, 0), "nsamples")
    usage_error(lambda: data.calibration_ids(tok, [path], -1, 8, 0), "nsamples")
    usage_error(lambda: data.calibration_ids(tok, [path], 2, 1, 0), "seqlen")
    usage_error(lambda: data.calibration_ids(tok, [path], 2, 8, "x"), "seed")
    usage_error(lambda: data.evaluation_ids(tok, [path], 1), "max_tokens")
    usage_error(lambda: data.load_texts([path], "training"), "'training'")
    usage_error(lambda: data.load_texts([""], "calibration"), "non-empty")


def test_text_shorter_than_one_window(tok, tmp_path):
    (tmp_path / "short.txt").write_text("only a few words")
    n = encode(tok, "only a few words").numel()
    usage_error(
        lambda: data.calibration_ids(tok, [str(tmp_path / "short.txt")], 1, n + 1, 0),
        "short.txt", f"{n} tokens", f"seqlen={n + 1}",
    )


def test_evaluation_needs_two_tokens(tok, tmp_path):
    (tmp_path / "one.txt").write_text("a")
    assert encode(tok, "a").numel() == 1
    usage_error(lambda: data.evaluation_ids(tok, [str(tmp_path / "one.txt")], None), "one.txt", "1 tokens")


def test_missing_and_unknown_sources(tmp_path):
    usage_error(lambda: data.load_texts([str(tmp_path / "nope.txt")], "calibration"), "nope.txt", "not found")
    usage_error(lambda: data.load_texts(["corpora/missing"], "calibration"), "corpora/missing", "not found")
    message = usage_error(lambda: data.load_texts(["wikitext3"], "calibration"), "'wikitext3'")
    for name in ("default", "wikitext2", "c4", "ptb"):
        assert name in message


def test_folder_without_usable_files(tmp_path):
    (tmp_path / "empty").mkdir()
    usage_error(lambda: data.load_texts([str(tmp_path / "empty")], "calibration"), "empty")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("text\nhello")
    usage_error(lambda: data.load_texts([str(tmp_path / "csv")], "calibration"), "csv", ".txt")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello")
    usage_error(lambda: data.load_texts([str(tmp_path / "a.csv")], "calibration"), "a.csv", "unsupported")


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\t\n", "empty"),
        ("empty.txt.gz", gzip.compress(b""), "empty"),
        ("empty.jsonl", b"\n\n", "empty"),
        ("binary.txt", bytes(range(256)) * 4, "binary"),
        ("nul.txt", b"text\x00with a NUL", "binary"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "UTF-8"),
        ("notgzip.txt.gz", b"plain, not gzip", "cannot read"),
        ("truncated.txt.gz", gzip.compress(b"hello world " * 100)[:40], "cannot read"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "line 2"),
        ("notext.jsonl", b'{"body": "no text field"}\n', "'text' field"),
        ("list.jsonl", b'["text"]\n', "'text' field"),
        ("number.jsonl", b'{"text": 3}\n', "not a string"),
        ("notparquet.parquet", b"PAR1 but not really", "parquet"),
    ],
)
def test_bad_files(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    usage_error(lambda: data.load_texts([str(tmp_path / name)], "evaluation"), name, needle)


def test_bad_parquet_files(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    for name, needle in [("nocol", "'text' column"), ("norows", "empty"), ("ints", "not strings")]:
        path = str(tmp_path / f"{name}.parquet")
        usage_error(lambda path=path: data.load_texts([path], "calibration"), f"{name}.parquet", needle)


def test_bad_file_inside_folder_names_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.jsonl").write_text('{"title": "x"}\n')
    usage_error(lambda: data.load_texts([str(tmp_path)], "calibration"), "bad.jsonl", "'text' field")
