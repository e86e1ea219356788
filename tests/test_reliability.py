"""Reliability: the output folder under kills (SIGKILL, SIGINT) and a full disk, numerical faults,
safety (remote code, file formats, secrets) and determinism of the written weights."""

from __future__ import annotations

import ast
import contextlib
import copy
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import llmprune
from llmprune import save as save_module
from llmprune.__main__ import main
from llmprune.errors import NumericalError
from llmprune.methods.sparsegpt import InputHessian

from conftest import SMALL_TEXT, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_secretXYZ" + "q8W3e5R7t9Y1u2I4o6P0"  # looks like a Hugging Face token
FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-data", "none", "--no-progress"]
FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "README.md", "llmprune.json"}


def cli(model, calib, out, *extra) -> list[str]:
    return ["--model", str(model), "--calib-data", str(calib), "--output", str(out), *FAST, *extra]


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_in_process(argv: list[str], threads: int = 1) -> int:
    with torch_threads(threads):
        return main(argv)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_complete(folder: Path, reference: Path | None = None) -> None:
    """Every file there, the report parses, transformers loads model and tokenizer; with a
    reference: the same weights, byte for byte."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in folder.iterdir()}
    assert FILES <= names, sorted(names)
    json.loads((folder / "llmprune.json").read_text(encoding="utf-8"))
    AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    assert_only_safetensors(folder)
    if reference is not None:
        assert (folder / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def assert_only_safetensors(folder: Path) -> None:
    """No pickle-based weights: no such suffix, and no file that is a pickle or a torch.save zip."""
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"), path
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_folder, calib_file):
    """In-process outputs on one thread: ``new`` (wanda, what the kill tests run) and ``old``
    (magnitude, what they replace)."""
    base = tmp_path_factory.mktemp("reference")
    assert run_in_process(cli(model_folder, calib_file, base / "new", "--method", "wanda")) == 0
    assert run_in_process(cli(model_folder, calib_file, base / "old", "--method", "magnitude")) == 0
    assert leftovers(base) == []  # a normal exit leaves no temporary folder
    return {"new": base / "new", "old": base / "old"}


# ----------------------------------------------------------------------------- kills during saving

DELAY = 0.2  # a pause of this after each step of save_folder (tests/run_with_save_delay.py)
# (signal, replace an existing folder?, range of the kill point): point k.f = a fraction f of the
# pause after step k, seen done on disk: 0 temporary folder made, 1 weights, 2 tokenizer, 3 model
# card, 4 report and flush, 5 the folder put in place (an old one swapped out in one step; it is
# deleted after the pause). Each run draws its points at random within the ranges (every
# `python -m llmprune` costs ~6 s of CPU to start, so a run tries seven points, not all steps).
KILLS = [("SIGKILL", False, (0, 4.9)), ("SIGKILL", False, (5, 5.8)),
         ("SIGINT", False, (0, 4.9)), ("SIGINT", False, (5, 5.8)),
         ("SIGKILL", True, (0, 4.9)), ("SIGKILL", True, (5, 5.8)), ("SIGINT", True, (0, 5.8))]


def child_env(threads: int = 1, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "HF_TOKEN": SECRET, "PYTHONHASHSEED": str(random.randrange(1, 2**31))}, **extra)
    return env


def kill_during_save(process: subprocess.Popen, parent: Path, name: str, sig: int, at: float) -> dict:
    """Send ``sig`` at point ``at`` of the save: wait until the step int(at) is seen done on disk
    (0 the temporary folder exists, 1 weights, 2 tokenizer, 3 card, 4 report, 5 the folder is in
    place), then a fraction at % 1 of the pause that follows it."""
    prefix = f".{name}.tmp-{process.pid}-"
    target = parent / name
    old = target.stat().st_ino if target.exists() else None

    def temporary() -> Path | None:
        return next((parent / e for e in os.listdir(parent) if e.startswith(prefix)), None)

    def has(filename: str) -> bool:
        folder = temporary()
        return folder is not None and (folder / filename).exists()

    def installed() -> bool:
        with contextlib.suppress(OSError):
            return target.stat().st_ino != old
        return False

    step = [lambda: temporary() is not None, lambda: has("model.safetensors"), lambda: has("tokenizer.json"),
            lambda: has("README.md"), lambda: has("llmprune.json"), installed][int(at)]
    deadline, sent = time.monotonic() + 240, False
    while process.poll() is None and time.monotonic() < deadline:
        if step():
            time.sleep(at % 1 * DELAY)
            process.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    out, err = process.communicate(timeout=240)
    return {"rc": process.returncode, "out": out, "err": err, "sent": sent}


@pytest.mark.slow
@pytest.mark.subprocess
def test_kills_during_save_leave_target_absent_old_or_complete(tmp_path, model_folder, calib_file, reference):
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    cases = [(sig, replace, rng.uniform(*span)) for sig, replace, span in KILLS]
    old_bytes = folder_bytes(reference["old"])
    env = child_env(threads=1)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # children must start with SIGINT handled (Python's KeyboardInterrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        processes = []
        for i, (_sig, replace, _at) in enumerate(cases):
            parent = tmp_path / f"case{i}"
            parent.mkdir()
            if replace:
                shutil.copytree(reference["old"], parent / "out")
            argv = cli(model_folder, calib_file, parent / "out", "--method", "wanda",
                       *(["--overwrite"] if replace else []))
            processes.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "run_with_save_delay.py"),
                                               str(DELAY), *argv], cwd=parent, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finally:
        signal.signal(signal.SIGINT, previous)
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda job: kill_during_save(job[0], tmp_path / f"case{job[1]}", "out",
                                                             getattr(signal, cases[job[1]][0]), cases[job[1]][2]),
                                [(p, i) for i, p in enumerate(processes)]))

    for i, ((sig, replace, at), result, process) in enumerate(zip(cases, results, processes)):
        where = f"case {i}: {sig} at {at:.2f} pauses, replace={replace}, seed {seed}: {result['err'][-2000:]}"
        parent, target = tmp_path / f"case{i}", tmp_path / f"case{i}" / "out"
        assert result["sent"], where
        assert SECRET not in result["out"] + result["err"], where
        assert "Traceback" not in result["err"], where
        if sig == "SIGKILL":
            assert result["rc"] == -signal.SIGKILL, where
        else:  # handled: exit code 130, one line, and no temporary folder left
            assert result["rc"] == 130, where
            lines = result["err"].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("interrupted; "), where
            assert leftovers(parent) == [], where
        if replace:  # the old complete folder or the new complete one, never anything else
            if target.exists() and folder_bytes(target) == old_bytes:
                outcome = "old"
            else:
                assert_complete(target, reference["new"])
                outcome = "new"
        elif target.exists():
            assert_complete(target, reference["new"])
            outcome = "new"
        else:
            outcome = "absent"
        print(f"{sig} at {at:.2f} pauses, replace={replace}: target {outcome}, left {leftovers(parent)}")
        if sig == "SIGINT":
            assert ("written completely" in result["err"]) == (outcome == "new"), where
        if target.exists():
            for path in target.rglob("*"):
                assert not path.is_file() or SECRET.encode() not in path.read_bytes(), where
        # Whatever a SIGKILL left is debris of a dead process (its temporary folder, its unlocked lock
        # file): the next run to the same target removes it.
        for name in leftovers(parent):
            assert re.fullmatch(rf"\.out\.(tmp|old)-{process.pid}-\w+|\.out\.llmprune\.lock", name), where
        if sig == "SIGKILL":
            assert run_in_process(cli(model_folder, calib_file, target, "--method", "wanda", "--overwrite")) == 0
            assert leftovers(parent) == [], where
            assert_complete(target, reference["new"])


# ----------------------------------------------------------------------------- leftovers of dead runs
# (which temporary folders count as stale, by their lock rather than a process id: test_hostile_output.py)


# ----------------------------------------------------------------------------- full disk, failed renames


def fill_disk_at(where: str, monkeypatch) -> None:
    """Simulate a full disk: the safetensors writer stops half-way with the error it raises on a
    really full file system (seen on a 700 kB tmpfs), or the flush before the rename reports ENOSPC."""
    if where == "weights":
        import transformers.modeling_utils as modeling_utils
        from safetensors import SafetensorError

        def full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 4096)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    else:
        def fsync(descriptor):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("where", ["weights", "flush"])
@pytest.mark.parametrize("replace", [False, True], ids=["fresh", "overwrite"])
def test_full_disk_is_one_line_exit_1_with_no_folder_left(tmp_path, model_folder, calib_file, reference,
                                                          monkeypatch, capsys, where, replace):
    target = tmp_path / "out"
    if replace:
        shutil.copytree(reference["old"], target)
    fill_disk_at(where, monkeypatch)
    rc = run_in_process(cli(model_folder, calib_file, target, "--method", "magnitude", *(["--overwrite"] * replace)))
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert err.startswith("error: cannot write the output folder") and "\n" not in err, err
    assert "No space left on device" in err and "nothing was saved" in err, err
    assert leftovers(tmp_path) == []
    if replace:
        assert "existing folder is unchanged" in err
        assert folder_bytes(target) == folder_bytes(reference["old"])
    else:
        assert not target.exists()


def test_replacement_without_atomic_exchange(tmp_path, model_folder, calib_file, reference, monkeypatch, capsys):
    """Where renameat2 is missing: move the old folder aside, rename the new one in; a failure of
    the second rename puts the old folder back."""
    monkeypatch.setattr(save_module, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    shutil.copytree(reference["old"], target)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".out.tmp-") and Path(dst).resolve() == target.resolve():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    args = cli(model_folder, calib_file, target, "--method", "wanda", "--overwrite")
    assert run_in_process(args) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert folder_bytes(target) == folder_bytes(reference["old"]) and leftovers(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)
    assert run_in_process(args) == 0
    assert_complete(target, reference["new"])
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- numerical faults


@pytest.fixture
def faulty_folder(tmp_path, tokenizer):
    def make(value: float):
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.layers[1].post_attention_layernorm.weight[3] = value
        folder = tmp_path / f"faulty-{value}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return make


@pytest.mark.parametrize("value", [float("nan"), 1e30], ids=["nan", "overflow"])
@pytest.mark.parametrize("method", [["wanda"], ["sparsegpt"], ["structured", "--ffn", "0.25", "--score", "flap"]],
                         ids=["wanda", "sparsegpt", "structured"])
def test_non_finite_activations_stop_the_run_naming_layer_and_module(faulty_folder, calib_file, tmp_path, capsys,
                                                                     method, value):
    out = tmp_path / "out"
    assert run_in_process(cli(faulty_folder(value), calib_file, out, "--method", *method)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("numerical failure: non-finite values (NaN or inf) in ") and "\n" not in err, err
    # the layer and the module: e.g. "calibration statistics of model.layers.1.mlp.gate_proj"
    assert re.search(r"model\.layers\.1\.(mlp|self_attn|post_attention_layernorm)\b", err), err
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_finite_input_of_a_layer_is_named():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(NumericalError, match=r"model\.layers\.0"):
        llmprune.prune_structured(model, torch.randint(0, 512, (2, 16)), ffn=0.25, progress=False)


def shifted_hessian(shift_fraction: float):
    """H - (smallest eigenvalue + shift_fraction * mean diag H) I: smallest eigenvalue becomes
    -shift_fraction * mean diag H, so dampening of more than shift_fraction is needed."""
    full_hessian = InputHessian.hessian

    def hessian(self, consume=False):
        h = full_hessian(self)
        shift = torch.linalg.eigvalsh(h)[0] + shift_fraction * torch.diag(h).mean()
        return (h - shift * torch.eye(h.shape[0], dtype=h.dtype)).float()
    return hessian


def test_indefinite_hessian_is_retried_with_more_dampening_then_refused(model_folder, calib_file, tmp_path,
                                                                        monkeypatch, capsys, caplog):
    monkeypatch.setattr(InputHessian, "hessian",
                        lambda self, consume=False: -torch.eye(self.sum_xtx.shape[0]) - self.sum_xtx)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="llmprune.methods.sparsegpt"):
        assert run_in_process(cli(model_folder, calib_file, out, "--method", "sparsegpt")) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("numerical failure: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
                   "model.layers.0.self_attn.v_proj: Hessian is not positive definite even with dampening 100")
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 4 and all(m.startswith("model.layers.0.self_attn.q_proj") for m in retries)
    assert [m.rsplit(" ", 1)[1] for m in retries] == ["0.1", "1", "10", "100"]
    assert not out.exists() and leftovers(tmp_path) == []


def test_mildly_indefinite_hessian_is_rescued_and_logged(model_folder, calib_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(InputHessian, "hessian", shifted_hessian(0.05))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="llmprune.methods.sparsegpt"):
        assert run_in_process(cli(model_folder, calib_file, out, "--method", "sparsegpt")) == 0
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 3 * 4  # once per input group (qkv, o, gate/up, down) of each of 3 layers
    assert all("dampening 0.01; retrying with 0.1" in m for m in retries)
    report = json.loads((out / "llmprune.json").read_text())
    assert report["prune"]["overall_sparsity"] == 0.5


def test_zero_variance_input_columns_give_no_nan():
    """Columns constant over every calibration token (dead channels, and with one repeated token
    every column of the first layer's input) are handled by every method without NaN."""
    base = tiny_model("llama")
    with torch.no_grad():
        base.model.layers[0].input_layernorm.weight[:3] = 0  # q/k/v inputs 0-2 of layer 0: always zero
        base.model.layers[1].self_attn.v_proj.weight[:16] = 0  # KV head 0: o_proj inputs of its heads zero
        base.model.layers[1].mlp.gate_proj.weight[:5] = 0  # silu(0) = 0: down_proj inputs 0-4 zero
    calibrations = {"repeated token": torch.full((3, 16), 7), "text": torch.randint(0, 512, (3, 16))}
    ids = torch.randint(0, 512, (1, 12))
    for label, calibration in calibrations.items():
        for kwargs in (dict(method="wanda"), dict(method="sparsegpt"), dict(method="sparsegpt", pattern="2:4")):
            model = copy.deepcopy(base)
            report = llmprune.prune(model, calibration, progress=False, **kwargs)
            assert 0.5 <= report.overall_sparsity < 0.53, (label, kwargs)  # the zeroed weights count too
            assert all(torch.isfinite(p).all() for p in model.parameters()), (label, kwargs)
            if kwargs["method"] == "sparsegpt":  # a dead input's weights are zero
                assert (model.model.layers[0].self_attn.q_proj.weight[:, :3] == 0).all()
        for allocation in ("uniform", "global"):
            model = copy.deepcopy(base)
            llmprune.prune_structured(model, calibration, heads=0.5, ffn=0.25, score="flap", allocation=allocation,
                                      progress=False)
            assert all(torch.isfinite(p).all() for p in model.parameters()), (label, allocation)
            with torch.no_grad():
                assert torch.isfinite(model(ids).logits).all(), (label, allocation)


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("where", ["known-type", "unknown-type", "tokenizer"])
def test_auto_map_without_consent_is_refused_and_never_run(model_folder, calib_file, tmp_path, capsys, where):
    folder = tmp_path / "remote"
    shutil.copytree(model_folder, folder)
    marker = tmp_path / "ran.txt"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('the folder code ran')\n"
                                    "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilTokenizer: pass\n")
    name = "tokenizer_config.json" if where == "tokenizer" else "config.json"
    config = json.loads((folder / name).read_text())
    if where == "tokenizer":
        config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    else:
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        if where == "unknown-type":
            config["model_type"] = "evil_lm"
    (folder / name).write_text(json.dumps(config))
    out = tmp_path / "out"
    assert run_in_process(cli(folder, calib_file, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model ") and "\n" not in err, err
    assert "evil.py" in err and "--trust-remote-code" in err, err
    assert not marker.exists() and not out.exists()


def test_package_never_passes_trust_remote_code_true():
    for path in (ROOT / "llmprune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{path}:{node.lineno}"


def test_secrets_never_reach_output_logs_or_reports(model_folder, tmp_path, monkeypatch, capfd, reference):
    assert_only_safetensors(reference["new"])
    path_token = "hf_" + "AbCdEfGhIjKlMnOpQrSt"
    calib = tmp_path / path_token / "text.txt"  # a token inside a path on the command line
    calib.parent.mkdir()
    calib.write_text(SMALL_TEXT, encoding="utf-8")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MY_SERVICE_API_KEY", "k3y-v4lue-0f-th3-s3rvice")
    out = tmp_path / "out"
    assert run_in_process(cli(model_folder, calib, out, "--method", "wanda")) == 0
    captured = capfd.readouterr()
    for secret in (SECRET, path_token, "k3y-v4lue-0f-th3-s3rvice"):
        assert secret not in captured.out + captured.err
        for path in out.rglob("*"):
            assert secret.encode() not in path.read_bytes(), (secret, path.name)
    report = json.loads((out / "llmprune.json").read_text())
    assert "hf_***" in report["command"]
    assert_only_safetensors(out)


def test_redaction_patterns(monkeypatch):
    monkeypatch.setenv("SOME_SECRET", "correct-horse-battery")
    text = ("--model https://user:pa55word@host/x token=abc123 hf_abcdefghijklmnop ghp_" + "a" * 30 +
            " correct-horse-battery api_key: zzzzzzzz")
    redacted = save_module.redact({"command": text, "list": [text], "n": 3})
    for secret in ("pa55word", "abc123", "hf_abcdefghijklmnop", "a" * 30, "correct-horse-battery", "zzzzzzzz"):
        assert secret not in json.dumps(redacted)
    assert redacted["n"] == 3 and "https://user:***@host/x" in redacted["command"]


# ----------------------------------------------------------------------------- determinism

METHODS = {"wanda": ["--method", "wanda"], "sparsegpt": ["--method", "sparsegpt"],
           "structured": ["--method", "structured", "--heads", "0.5", "--ffn", "0.25", "--score", "flap"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_same_seed_gives_byte_identical_weights(model_folder, calib_file, tmp_path, monkeypatch, method):
    import llmprune.evaluate

    real_speed = llmprune.evaluate.measure_speed  # structured runs time the model: shortened, it changes no weight
    monkeypatch.setattr(llmprune.evaluate, "measure_speed",
                        lambda model, device=None, **_: real_speed(model, device, prompt_tokens=8, new_tokens=2,
                                                                   repeats=1))
    weights = {}
    for threads in (1, 2):
        for attempt in range(2):
            out = tmp_path / f"out-{threads}-{attempt}"
            assert run_in_process(cli(model_folder, calib_file, out, "--seed", "3", *METHODS[method]), threads) == 0
            weights[threads, attempt] = (out / "model.safetensors").read_bytes()
    assert weights[1, 0] == weights[1, 1]
    assert weights[2, 0] == weights[2, 1]
    # One thread against two: Wanda's masks and FLAP's cuts come out the same here; SparseGPT's
    # weight updates are sums whose order BLAS picks by thread count, so their last bits differ.
    if method != "sparsegpt":
        assert weights[1, 0] == weights[2, 0]
