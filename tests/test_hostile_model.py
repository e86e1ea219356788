"""Hostile input models and checkpoints: every damaged or inconsistent model folder and every
forged resume checkpoint ends in one ``error:`` line on stderr and exit code 2, with no traceback
and no output folder; a corruption that happens to be harmless must give the same pruned weights
as the intact model.

Classes covered: safetensors files (header length, truncation, garbage in the header JSON, tensor
offsets, dtypes and shapes, shard indexes), pickle-only folders, config.json values (sizes,
heads, layers, types, missing keys, a stray ``text_config``, a ``quantization_config`` whose
package is absent, not JSON / not an object), a config that does not fit the weights (more or
fewer layers, another hidden size) on the in-memory, streaming and device-map paths, and the
``--checkpoint-dir`` of an interrupted run (forged ``checkpoint.json``, cut or changed layer
files). The generated examples are derandomised (fixed seed, no example database).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from transformers import AutoConfig

from llmprune.__main__ import main
from llmprune.checkpoint import LayerCheckpoint

from conftest import ARCHITECTURES, tiny_model, write_text_sample

SETTINGS = dict(deadline=None, derandomize=True, database=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-data", "none", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """An intact tiny Llama folder, a text file, and the magnitude-pruned weights of the intact model."""
    root = tmp_path_factory.mktemp("hostile")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    text = write_text_sample(root / "text.txt")
    reference = root / "reference"
    assert main(["--model", str(base), "--calib-data", str(text), "--method", "magnitude", "--output",
                 str(reference), *FAST]) == 0
    return {"root": root, "base": base, "text": text, "reference": digest(reference / "model.safetensors")}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_model(world, **kwargs) -> Path:
    folder = Path(tempfile.mkdtemp(dir=world["root"], prefix="case-")) / "model"
    shutil.copytree(world["base"], folder, **kwargs)
    return folder


def run(world, folder: Path, capsys, *extra, method="magnitude") -> tuple[int, str, Path]:
    """The CLI in process on ``folder``; (exit code, stderr, the output folder it was given)."""
    output = folder.parent / "out"
    capsys.readouterr()
    code = main(["--model", str(folder), "--calib-data", str(world["text"]), "--method", method,
                 "--output", str(output), *FAST, *extra])
    return code, capsys.readouterr().err, output


def assert_refused(code: int, err: str, output: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not output.exists() and not any(output.parent.glob(".out*")), "nothing may be written"
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_refused_or_same(world, code: int, err: str, output: Path) -> None:
    """A refusal, or (a harmless change) a run whose pruned weights equal the intact model's."""
    event("harmless: same weights" if code == 0 else "refused")
    if code == 0:
        assert "Traceback" not in err
        assert digest(output / "model.safetensors") == world["reference"]
        AutoConfig.from_pretrained(output)  # the written config.json loads
    else:
        assert_refused(code, err, output)


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_with_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# ----------------------------------------------------------------------------- explicit cases


def cut_in_half(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def huge_header_length(folder):
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + path.read_bytes()[8:])


def entry_edit(change):
    def edit(folder):
        header, body = header_of(folder / "model.safetensors")
        change(header)
        write_with_header(folder / "model.safetensors", header, body)
    return edit


def first_tensor(header) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def offsets_past_end(header):
    first_tensor(header)["data_offsets"][1] += 10**9


def overlapping(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])


def wrong_dtype(header):
    first_tensor(header)["dtype"] = "F16"  # half the bytes its offsets give


def wrong_shape(header):
    first_tensor(header)["shape"] = [3, 3]


def pickle_only(folder):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def sharded_missing_shard(folder):
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors"
                                            for k in header_of(folder / "model.safetensors")[0]}}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def sharded_escaping_index(folder):
    sharded_missing_shard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../base/model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def config_text(text):
    return lambda folder: (folder / "config.json").write_text(text)


def config_value(**values):
    return lambda folder: edit_config(folder, lambda c: c.update(values))


FILE_CASES = {
    "cut in half": (cut_in_half, "cut short"),
    "header length 2^60": (huge_header_length, "header length"),
    "offsets past the end": (entry_edit(offsets_past_end), "data_offsets"),
    "overlapping tensors": (entry_edit(overlapping), "overlapping"),
    "dtype against size": (entry_edit(wrong_dtype), "data_offsets"),
    "shape against size": (entry_edit(wrong_shape), "data_offsets"),
    "header not json": (lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{"), "not JSON"),
    "empty file": (lambda f: (f / "model.safetensors").write_bytes(b""), "shorter than"),
    "pickle only": (pickle_only, "pickle"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "index names a missing shard": (sharded_missing_shard, "is missing"),
    "index names a file outside": (sharded_escaping_index, "not a file in the folder"),
}
CONFIG_CASES = {
    "more layers than weights": (config_value(num_hidden_layers=5), "lacks: model.layers.3."),
    "fewer layers than weights": (config_value(num_hidden_layers=2), "does not describe: model.layers.2."),
    "hidden_size against weights": (config_value(hidden_size=32), "shape"),
    "heads do not divide hidden_size": (config_value(num_attention_heads=6, num_key_value_heads=2, head_dim=None),
                                        "does not divide hidden_size"),
    "kv heads do not divide heads": (config_value(num_key_value_heads=3), "does not divide num_attention_heads"),
    "zero layers": (config_value(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    "negative layers": (config_value(num_hidden_layers=-3), "num_hidden_layers must be a positive integer"),
    "huge hidden_size": (config_value(hidden_size=10**12), "does not fit the weights"),
    "string hidden_size": (config_value(hidden_size="64"), "hidden_size must be a positive integer"),
    "missing package quantization": (config_value(quantization_config={"quant_method": "gptq", "bits": 4}),
                                     "optimum"),
    "malformed quantization": (config_value(quantization_config=[1]), "quantization_config"),
    "stray text_config": (config_value(text_config={"hidden_size": 32}), "text_config"),
    "not json": (config_text("{not json"), "not valid JSON"),
    "not an object": (config_text("[1, 2, 3]"), "JSON object"),
    "no model_type": (lambda f: edit_config(f, lambda c: c.pop("model_type")), "model_type"),
}


@pytest.mark.parametrize("case", list(FILE_CASES) + list(CONFIG_CASES))
def test_each_broken_model_is_one_line_exit_2(world, capsys, case):
    corrupt, words = {**FILE_CASES, **CONFIG_CASES}[case]
    folder = copy_model(world)
    corrupt(folder)
    assert_refused(*run(world, folder, capsys), words)


@pytest.mark.parametrize("placement", [["--stream"], ["--device-map", "auto"]])
@pytest.mark.parametrize("case", ["more layers than weights", "fewer layers than weights",
                                  "hidden_size against weights", "cut in half", "pickle only"])
def test_stream_and_device_map_make_the_same_checks(world, capsys, placement, case):
    corrupt, words = {**FILE_CASES, **CONFIG_CASES}[case]
    folder = copy_model(world)
    corrupt(folder)
    assert_refused(*run(world, folder, capsys, *placement), words)


def test_streaming_reader_checks_the_checkpoint_itself(world):
    """The API entry of streaming (no CLI checks before it) refuses a config that lacks weights."""
    import torch

    from llmprune.errors import UsageError
    from llmprune.stream import prune_streaming

    folder = copy_model(world)
    config_value(num_hidden_layers=4)(folder)
    with pytest.raises(UsageError, match="lacks: model.layers.3"):
        prune_streaming(folder, None, None, method="magnitude", sparsity=0.5, pattern=None,
                        device=torch.device("cpu"), dtype=torch.float32, progress=False)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_intact_folders_of_every_family_pass_the_checks(tmp_path, model_type, tied):
    from llmprune.models.validate import check_model_folder

    tiny_model(model_type, tie_word_embeddings=tied).save_pretrained(tmp_path / "m")
    check_model_folder(tmp_path / "m")
    check_model_folder(tmp_path / "m", strict=True)


def test_intact_sharded_folder_and_smollm2_pass_the_checks(tmp_path, smollm2_folder):
    from llmprune.models.validate import check_model_folder

    tiny_model("llama").save_pretrained(tmp_path / "m", max_shard_size="100KB")
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    check_model_folder(tmp_path / "m", strict=True)
    check_model_folder(smollm2_folder, strict=True)  # tied embeddings: lm_head.weight is not stored


def test_a_stored_copy_of_a_computed_buffer_is_not_refused(world, capsys):
    """Older checkpoints stored the rotary ``inv_freq`` table, which the model recomputes."""
    folder = copy_model(world)

    def add_inv_freq(header):
        header["model.layers.0.self_attn.rotary_emb.inv_freq"] = {"dtype": "F32", "shape": [0],
                                                                  "data_offsets": [0, 0]}
    entry_edit(add_inv_freq)(folder)
    code, err, output = run(world, folder, capsys)
    assert code == 0, err
    assert digest(output / "model.safetensors") == world["reference"]


# ----------------------------------------------------------------------------- generated corruptions

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F4", "Q4", "", "f32", 7, None]
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


@st.composite
def header_corruptions(draw):
    """(description, function of (header bytes, header dict, body) -> new file bytes)."""
    kind = draw(st.sampled_from(["length", "truncate", "garbage", "offsets", "dtype", "shape", "entry"]))
    if kind == "length":
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096)))
        return kind, lambda raw, header, body: struct.pack("<Q", value) + raw[8:]
    if kind == "truncate":
        fraction = draw(st.floats(0, 0.999))
        return kind, lambda raw, header, body: raw[: int(len(raw) * fraction)]
    if kind == "garbage":
        start, size = draw(st.integers(0, 2000)), draw(st.integers(1, 16))
        junk = draw(st.binary(min_size=size, max_size=size))

        def garbage(raw, header, body):
            length = struct.unpack("<Q", raw[:8])[0]
            at = 8 + start % length
            return raw[:at] + junk[: length - (at - 8)] + raw[at + len(junk[: length - (at - 8)]):]
        return kind, garbage
    index = draw(st.integers(0, 29))
    if kind == "offsets":
        change = draw(st.lists(st.one_of(st.integers(-10, 2**64), st.integers(0, 1 << 20)), min_size=0, max_size=3))
        field = ("data_offsets", change)
    elif kind == "dtype":
        field = ("dtype", draw(st.sampled_from(DTYPES)))
    elif kind == "shape":
        field = ("shape", draw(st.lists(st.integers(-2, 600), max_size=3)))
    else:
        field = (draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"])), draw(JSON_VALUES))

    def edit(raw, header, body):
        names = sorted(k for k in header if k != "__metadata__")
        header[names[index % len(names)]][field[0]] = field[1]
        encoded = json.dumps(header).encode()
        return struct.pack("<Q", len(encoded)) + encoded + body
    return f"{kind} {field[0]}={str(field[1])[:60]}", edit


@settings(**SETTINGS)
@given(corruption=header_corruptions())
def test_random_safetensors_corruptions_are_refused_in_one_line(world, capsys, corruption):
    description, corrupt = corruption
    note(description)
    folder = copy_model(world)
    path = folder / "model.safetensors"
    header, body = header_of(path)
    path.write_bytes(corrupt(path.read_bytes(), header, body))
    assert_refused_or_same(world, *run(world, folder, capsys))


CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "model_type",
                 "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "hidden_act", "torch_dtype", "dtype",
                 "architectures", "text_config", "quantization_config", "attention_bias", "mlp_bias"]
CONFIG_VALUES = st.one_of(st.integers(-5, 130), st.sampled_from([0, -1, 2**31, 2**63, 10**30, 1.5, 64.0, True]),
                          JSON_VALUES)


@settings(**SETTINGS)
@given(changes=st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), st.one_of(st.just("<delete>"), CONFIG_VALUES)),
                        min_size=1, max_size=2))
def test_random_config_values_are_refused_or_harmless(world, capsys, changes):
    note(repr(changes))
    folder = copy_model(world)

    def apply(config):
        for field, value in changes:
            if value == "<delete>":
                config.pop(field, None)
            else:
                config[field] = value
    edit_config(folder, apply)
    assert_refused_or_same(world, *run(world, folder, capsys))


# ----------------------------------------------------------------------------- resume checkpoints


class Killed(BaseException):
    """Stands for the process dying right after a layer was committed."""


@pytest.fixture(scope="module")
def interrupted(world):
    """A --checkpoint-dir of a wanda run killed after layer 1 (two layers committed)."""
    folder = world["root"] / "interrupted"
    original = LayerCheckpoint.save_layer

    def save_layer(self, index, tensors, next_inputs):
        original(self, index, tensors, next_inputs)
        if index == 1:
            raise Killed

    patch = pytest.MonkeyPatch()
    patch.setattr(LayerCheckpoint, "save_layer", save_layer)
    try:
        with pytest.raises(Killed):
            main(["--model", str(world["base"]), "--calib-data", str(world["text"]), "--method", "wanda",
                  "--output", str(world["root"] / "never"), "--checkpoint-dir", str(folder), *FAST])
    finally:
        patch.undo()
    assert json.loads((folder / "checkpoint.json").read_text())["finished"] == 2
    return folder


def resume(world, checkpoint: Path) -> Path:
    """A copy of the interrupted run's checkpoint folder, to damage."""
    case = Path(tempfile.mkdtemp(dir=world["root"], prefix="resume-"))
    shutil.copytree(checkpoint, case / "ckpt")
    return case / "ckpt"


def forge_meta(change):
    def forge(folder):
        meta = json.loads((folder / "checkpoint.json").read_text())
        meta = change(meta)
        (folder / "checkpoint.json").write_text(json.dumps(meta))
    return forge


def cut_layer(folder):
    path = folder / "layer-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def flip_layer_byte(folder):
    path = folder / "layer-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


CHECKPOINT_CASES = {
    "a list": forge_meta(lambda m: [m]),
    "finished a string": forge_meta(lambda m: {**m, "finished": "abc"}),
    "finished negative": forge_meta(lambda m: {**m, "finished": -1}),
    "finished true": forge_meta(lambda m: {**m, "finished": True}),
    "finished float": forge_meta(lambda m: {**m, "finished": 1.0}),
    "finished beyond the files": forge_meta(lambda m: {**m, "finished": 3}),
    "finished beyond the model": forge_meta(lambda m: {**m, "finished": 99}),
    "no finished": forge_meta(lambda m: {k: v for k, v in m.items() if k != "finished"}),
    "no fingerprint": forge_meta(lambda m: {k: v for k, v in m.items() if k != "fingerprint"}),
    "fingerprint a list": forge_meta(lambda m: {**m, "fingerprint": [1]}),
    "no files": forge_meta(lambda m: {k: v for k, v in m.items() if k != "files"}),
    "files a string": forge_meta(lambda m: {**m, "files": "x"}),
    "not json": lambda f: (f / "checkpoint.json").write_text("{"),
    "layer file cut": cut_layer,
    "layer file changed": flip_layer_byte,
    "layer file missing": lambda f: (f / "layer-00000.safetensors").unlink(),
    "inputs file missing": lambda f: (f / "inputs-00002.safetensors").unlink(),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_one_line_exit_2(world, interrupted, capsys, case):
    checkpoint = resume(world, interrupted)
    CHECKPOINT_CASES[case](checkpoint)
    output = checkpoint.parent / "out"
    capsys.readouterr()
    code = main(["--model", str(world["base"]), "--calib-data", str(world["text"]), "--method", "wanda",
                 "--output", str(output), "--checkpoint-dir", str(checkpoint), *FAST])
    err = capsys.readouterr().err
    assert_refused(code, err, output, "--checkpoint-dir")
    assert "damaged" in err or "layers" in err  # "finished beyond the model" names the layer count


def test_intact_checkpoint_still_resumes(world, interrupted, capsys):
    checkpoint = resume(world, interrupted)
    output = checkpoint.parent / "out"
    capsys.readouterr()
    assert main(["--model", str(world["base"]), "--calib-data", str(world["text"]), "--method", "wanda",
                 "--output", str(output), "--checkpoint-dir", str(checkpoint), *FAST]) == 0
    assert (output / "model.safetensors").is_file() and not checkpoint.exists()
