"""Hostile output folders: a run never replaces, deletes or creates anything of the user's outside
its own output folder. Refusals (exit 2, one line) come before the model loads; two runs to one
folder cannot both write it; a live run's temporary folder is never taken for debris; SIGTERM
cleans up as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmprune import guard
from llmprune import save as save_module
from llmprune.__main__ import main
from llmprune.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-data", "none", "--no-progress"]
RECIPE = ROOT / "recipes" / "magnitude-50.yaml"


def snapshot(folder: Path) -> dict[str, object]:
    """Every path under ``folder``: file bytes, link targets, folders; what a refusal must not change."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            seen[key] = ("link", os.readlink(path))
        elif path.is_dir():
            seen[key] = "dir"
        else:
            seen[key] = path.read_bytes()
    return seen


def dotfiles(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def one_line_refusal(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- random hostile targets


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_folder, calib_file):
    """A home folder, a current folder, the input model, a folder of notes, a user's folder with
    files, each holding a victim file, and a symlink to each target (and to ``/``)."""
    root = tmp_path_factory.mktemp("world")
    for name in ("home", "work", "notes", "user"):
        (root / name).mkdir()
        (root / name / "victim.txt").write_bytes(b"precious " + name.encode())
    (root / "user" / "photos").mkdir()
    (root / "user" / "photos" / "cat.jpg").write_bytes(os.urandom(256))
    targets = {"home": root / "home", "cwd": root / "work", "model": model_folder, "inside_model": model_folder / "sub",
               "root": Path("/"), "nonempty": root / "notes", "user_folder": root / "user"}
    (root / "links").mkdir()
    for kind, path in targets.items():
        (root / "links" / kind).symlink_to(path)
    return {"root": root, "targets": targets, "calib": calib_file, "model": model_folder}


def spelled(world: dict, kind: str, spelling: str) -> str:
    path = world["targets"][kind]
    if spelling == "dotdot":  # a detour through a sibling folder that does not exist
        return str(path / "no-such-folder" / "..") if path != Path("/") else "/tmp/.."
    if spelling == "symlink":
        return str(world["root"] / "links" / kind)
    return str(path)


def command(world: dict, which: str, output: str, overwrite: bool) -> list[str]:
    model, calib = str(world["model"]), str(world["calib"])
    extra = ["--overwrite"] if overwrite else []
    if which == "sweep":
        return ["sweep", "--model", model, "--methods", "magnitude", "--sparsities", "0.5", "--output", output,
                "--calib-data", calib, "--no-progress", *extra]
    argv = ["--model", model, "--calib-data", calib, "--output", output, *FAST, *extra]
    if which == "dynamic":
        return argv + ["--method", "dynamic"]
    if which == "recipe":
        return ["--recipe", str(RECIPE)] + argv
    return argv + ["--method", "magnitude"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["home", "cwd", "model", "inside_model", "root", "nonempty", "user_folder"]),
       spelling=st.sampled_from(["plain", "dotdot", "symlink"]), overwrite=st.booleans(),
       which=st.sampled_from(["prune", "prune", "dynamic", "recipe", "sweep"]))
def test_hostile_output_targets_are_refused_before_any_work(world, monkeypatch, capsys, kind, spelling, overwrite,
                                                             which):
    root = world["root"]
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root / "work")
    before, top = snapshot(root), sorted(os.listdir("/"))
    model_before = snapshot(world["model"])
    loaded = []
    monkeypatch.setattr("llmprune.models.loading.load_model", lambda *a, **k: loaded.append(1))  # the one loader
    started = time.perf_counter()
    rc = main(command(world, which, spelled(world, kind, spelling), overwrite))
    err = capsys.readouterr().err
    where = f"{which} --output {kind} ({spelling}) overwrite={overwrite}: {err}"
    assert rc == 2, where
    line = one_line_refusal(err)
    assert str(world["targets"][kind].resolve()) in line, where
    assert not loaded and time.perf_counter() - started < 20, where
    assert snapshot(root) == before and snapshot(world["model"]) == model_before, where
    assert sorted(os.listdir("/")) == top, where


# ----------------------------------------------------------------------------- work folders and the output


@pytest.mark.parametrize("flags", [["--checkpoint-dir"], ["--device-map", "auto", "--offload-folder"],
                                   ["--stream", "--activations-on-disk"]], ids=["checkpoint", "offload", "activations"])
@pytest.mark.parametrize("relation", ["same", "output-inside", "output-holds"])
def test_output_overlapping_a_work_folder_is_refused_first(model_folder, calib_file, tmp_path, capsys, flags, relation):
    work, out = {"same": (tmp_path / "w", tmp_path / "w"), "output-inside": (tmp_path / "w", tmp_path / "w" / "o"),
                 "output-holds": (tmp_path / "o" / "w", tmp_path / "o")}[relation]
    before = snapshot(tmp_path)
    rc = main(["--model", str(model_folder), "--calib-data", str(calib_file), "--output", str(out), *FAST,
               *flags, str(work)])
    line = one_line_refusal(capsys.readouterr().err)
    assert rc == 2 and flags[-1] in line and str(out) in line, line
    assert snapshot(tmp_path) == before


def test_activations_on_disk_naming_a_file_is_refused_naming_it(model_folder, calib_file, tmp_path, capsys):
    (tmp_path / "acts").write_text("a file")
    rc = main(["--model", str(model_folder), "--calib-data", str(calib_file), "--output", str(tmp_path / "o"),
               *FAST, "--stream", "--activations-on-disk", str(tmp_path / "acts")])
    line = one_line_refusal(capsys.readouterr().err)
    assert rc == 2 and line == f"error: --activations-on-disk {str(tmp_path / 'acts')!r} exists and is not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]


def test_a_refused_run_creates_no_folder(model_folder, calib_file, tmp_path, capsys):
    """Refused before the claim (missing data) or after it (a model that does not load): the
    missing parents of --output are not left behind, nor is the lock file."""
    rc = main(["--model", str(model_folder), "--calib-data", str(tmp_path / "missing.txt"),
               "--output", str(tmp_path / "new" / "a" / "out"), *FAST])
    one_line_refusal(capsys.readouterr().err)
    assert rc == 2 and sorted(os.listdir(tmp_path)) == []
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((model_folder / "config.json").read_bytes())  # and no weights
    rc = main(["--model", str(broken), "--calib-data", str(calib_file), "--output", str(tmp_path / "new" / "out"),
               *FAST])
    one_line_refusal(capsys.readouterr().err)
    assert rc == 2 and sorted(os.listdir(tmp_path)) == ["broken"]


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_replaces_only_llmprune_folders_or_empty_ones(model_folder, calib_file, tmp_path, capsys):
    argv = ["--model", str(model_folder), "--calib-data", str(calib_file), *FAST, "--method", "magnitude"]
    out = tmp_path / "out"
    assert main(argv + ["--output", str(out)]) == 0
    first = json.loads((out / "llmprune.json").read_text())
    assert main(argv + ["--output", str(out), "--overwrite", "--sparsity", "0.25"]) == 0  # its own folder
    second = json.loads((out / "llmprune.json").read_text())
    assert second["prune"]["target_sparsity"] != first["prune"]["target_sparsity"]
    (tmp_path / "empty").mkdir()
    assert main(argv + ["--output", str(tmp_path / "empty"), "--overwrite"]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_bytes(b"\\documentclass{article}")
    (mine / "llmprune.json").symlink_to(out / "llmprune.json")  # a link to a report does not make it llmprune's
    before = snapshot(mine)
    capsys.readouterr()
    assert main(argv + ["--output", str(mine), "--overwrite"]) == 2
    assert "not written by llmprune" in one_line_refusal(capsys.readouterr().err)
    assert snapshot(mine) == before
    assert dotfiles(tmp_path) == []


# ----------------------------------------------------------------------------- installing never replaces


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_a_folder_that_appears_during_the_run_is_never_replaced(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(save_module, "_renameat2", lambda a, b, flags: False)
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="something else was put there"):
        with save_module.atomic_folder(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            target.mkdir()  # another program writes there meanwhile
            (target / "theirs.txt").write_bytes(b"theirs")
    assert snapshot(target) == {"theirs.txt": b"theirs"} and dotfiles(tmp_path) == []
    # with --overwrite, a folder that stopped being llmprune's is not replaced either
    (target / "llmprune.json").write_text("{}")
    with pytest.raises(OutputError, match="no longer empty or a folder llmprune wrote"):
        with save_module.atomic_folder(target, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            (target / "llmprune.json").unlink()
    assert snapshot(target) == {"theirs.txt": b"theirs"} and dotfiles(tmp_path) == []


# ----------------------------------------------------------------------------- temporary folders of live runs


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock, as a live run holds its temporary folder."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_live_temporaries_are_kept_and_stale_ones_removed_whatever_their_pid(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = [f".out.tmp-{gone.pid}-abc_123", f".out.tmp-{os.getpid()}-mine00", ".out.tmp-1-init00"]
    for name in stale:  # the pid in the name says nothing: our own, init's, a dead one
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".out.old-{gone.pid}-def456" / "out").mkdir(parents=True)  # moved aside, not yet replaced
    (tmp_path / f".out.old-{gone.pid}-def456" / "out" / "config.json").write_text("{}")
    live = tmp_path / f".out.tmp-{gone.pid}-live99"  # a live run in another pid namespace may show any pid
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    keep = [live.name, ".out.tmp-nopid12", f".other.tmp-{gone.pid}-jkl012"]
    for name in keep[1:]:
        (tmp_path / name).mkdir()
    holder = hold_lock(live)
    try:
        removed = save_module.remove_stale_temporaries(tmp_path / "out")
        assert sorted(p.name for p in removed) == sorted(stale + [f".out.old-{gone.pid}-def456"])
        assert (tmp_path / "out" / "config.json").read_text() == "{}"  # the old folder is back
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(keep)
        assert (live / "model.safetensors").read_bytes() == b"being written"
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in save_module.remove_stale_temporaries(tmp_path / "out")] == [live.name]


def test_own_temporary_folder_is_locked_while_it_exists(tmp_path):
    with save_module.atomic_folder(tmp_path / "out") as tmp:
        assert guard.folder_unlocked(tmp) is None  # held by this run
        assert save_module.remove_stale_temporaries(tmp_path / "out") == [] and tmp.is_dir()
        assert (tmp_path / ".out.llmprune.lock").exists()
    assert dotfiles(tmp_path) == [] and (tmp_path / "out").is_dir()


def test_lock_won_on_a_removed_lock_file_is_not_trusted(tmp_path, monkeypatch):
    """The holder removes the lock file before it lets go; a run that opened the old file just
    before must see that the path now names another file, and lock that one instead."""
    path = tmp_path / ".out.llmprune.lock"
    real_open, opened = os.open, []

    def open_then_lose_the_race(name, flags, *args):
        descriptor = real_open(name, flags, *args)
        opened.append(os.fstat(descriptor).st_ino)
        if len(opened) == 1:  # the holder unlinks it right after our open
            os.unlink(path)
        return descriptor

    monkeypatch.setattr(os, "open", open_then_lose_the_race)
    descriptor = guard._lock(path)
    monkeypatch.setattr(os, "open", real_open)
    assert descriptor not in (None, False) and len(opened) == 2
    assert guard._names(path, descriptor) and os.fstat(descriptor).st_ino == opened[1]
    os.close(descriptor)


# ----------------------------------------------------------------------------- real processes


def child_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, **extra)
    return env


def start(model_folder, calib_file, out: Path, save_delay: float | None = None) -> subprocess.Popen:
    """A pruning run in a child process; save_delay: its pause after each step of the save."""
    argv = ["--model", str(model_folder), "--calib-data", str(calib_file), "--output", str(out), *FAST,
            "--method", "magnitude"]
    program = ["-m", "llmprune"] if save_delay is None else [str(ROOT / "tests" / "run_with_save_delay.py"),
                                                             str(save_delay)]
    return subprocess.Popen([sys.executable, *program, *argv], cwd=out.parent, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_two_runs_to_one_output_one_succeeds_the_other_is_refused_at_once(model_folder, calib_file, tmp_path):
    out = tmp_path / "out"
    first = start(model_folder, calib_file, out, save_delay=3)  # holds the lock >= 18 s
    wait_for((tmp_path / ".out.llmprune.lock").exists, first)
    second = start(model_folder, calib_file, out)
    _, err = second.communicate(timeout=240)
    first_still_running = first.poll() is None
    _, first_err = first.communicate(timeout=240)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and first_still_running, err
    line = one_line_refusal(err)
    assert str(out) in line and "another llmprune run" in line, line
    assert {"model.safetensors", "llmprune.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert dotfiles(tmp_path) == []  # no temporary folder, no lock file


def test_sigterm_during_and_after_the_save_cleans_up_and_exits_143(model_folder, calib_file, tmp_path):
    """Two runs: SIGTERM once the weights are in the temporary folder (nothing is written), and
    once the folder is in place (held until the install is done: the folder is complete)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    during = start(model_folder, calib_file, tmp_path / "a" / "out", save_delay=1)
    after = start(model_folder, calib_file, tmp_path / "b" / "out", save_delay=1)

    def weights_written() -> bool:
        return any((p / "model.safetensors").exists() for p in (tmp_path / "a").glob(".out.tmp-*"))

    wait_for(weights_written, during)
    during.send_signal(signal.SIGTERM)
    wait_for((tmp_path / "b" / "out").exists, after)
    after.send_signal(signal.SIGTERM)
    for process, parent, expected in ((during, tmp_path / "a", "terminated; no output folder was written"),
                                      (after, tmp_path / "b", "terminated; the output folder")):
        _, err = process.communicate(timeout=240)
        assert process.returncode == 143, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected) and "Traceback" not in err, err
        assert dotfiles(parent) == []
    assert not (tmp_path / "a" / "out").exists()
    assert {"model.safetensors", "llmprune.json"} <= set(os.listdir(tmp_path / "b" / "out"))
