"""--push-to-hub through the real huggingface_hub client against a loopback stand-in for the Hub
(tests/fake_hub.py), selected with HF_ENDPOINT. The LFS upload path is used (HF_HUB_DISABLE_XET):
a loopback server cannot imitate Xet storage; with Xet on, the same server gives a clear error."""

from __future__ import annotations

import json
import logging

import pytest

from llmprune.__main__ import main

from fake_hub import FakeHub

TOKEN = "hf_" + "Zq7" * 10  # looks like a real token, so redaction would catch a leak


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file of the machine
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return monkeypatch


def _run(tiny_folder, text_file, out, *extra):
    return main(["--model", str(tiny_folder), "--method", "magnitude", "--eval-data", str(text_file),
                 "--eval-seqlen", "64", "--eval-tokens", "256", "--output", str(out), "--no-progress", *extra])


def _complete(folder):
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "README.md",
                                                        "llmprune.json", "tokenizer.json"))


def test_push_uploads_the_whole_folder(hub_env, tiny_folder, text_file, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeHub(TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        hub_env.setenv("HF_TOKEN", TOKEN)
        out = tmp_path / "out"
        assert _run(tiny_folder, text_file, out, "--push-to-hub", "me/tiny-pruned", "--private") == 0
    repo = hub.repos["me/tiny-pruned"]
    assert repo["visibility"] == "private" or repo["private"] is True
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert repo["files"] == local  # every file, byte for byte (weights through LFS)
    assert any(path.endswith(".git/info/lfs/objects/batch") for _, path in hub.requests)
    card = repo["files"]["README.md"].decode()
    for needed in ("base_model:", "magnitude", "realised_sparsity", "Protocol:", "perplexity"):
        assert needed in card
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert TOKEN not in json.dumps(json.loads(local["llmprune.json"]))
    assert "published" in captured.out and "me/tiny-pruned" in captured.out
    assert hub.card_metadata and hub.card_metadata[0]["base_model"] == tiny_folder.name
    assert hub.card_metadata[0]["llmprune"]["realised_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert hub.authorizations == {f"Bearer {TOKEN}"} and not [u for u in hub.unknown if "agent" not in u[1]]


def test_refused_upload_is_one_error_and_keeps_the_folder(hub_env, tiny_folder, text_file, tmp_path, capsys):
    with FakeHub(TOKEN, refuse=True) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        hub_env.setenv("HF_TOKEN", TOKEN)
        out = tmp_path / "out"
        assert _run(tiny_folder, text_file, out, "--push-to-hub", "someone-else/model") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "403" in err and "complete and kept" in err and TOKEN not in err
    assert _complete(out)


def test_wrong_token_is_refused(hub_env, tiny_folder, text_file, tmp_path, capsys):
    with FakeHub(TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        hub_env.setenv("HF_TOKEN", "hf_" + "W" * 30)
        out = tmp_path / "out"
        assert _run(tiny_folder, text_file, out, "--push-to-hub", "me/m") == 1
    err = capsys.readouterr().err
    assert "401" in err and "hf_WWWW" not in err and _complete(out)


def test_no_token(hub_env, tiny_folder, text_file, tmp_path, capsys):
    with FakeHub(TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        out = tmp_path / "out"
        assert _run(tiny_folder, text_file, out, "--push-to-hub", "me/m") == 1
    assert "no Hugging Face token" in capsys.readouterr().err
    assert _complete(out) and hub.requests == []


def test_no_network(hub_env, tiny_folder, text_file, tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    hub_env.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    assert _run(tiny_folder, text_file, out, "--push-to-hub", "me/m") == 1
    err = capsys.readouterr().err.strip()
    assert "cannot publish to me/m" in err and TOKEN not in err and _complete(out)


def test_xet_path_against_a_server_without_xet_is_a_clear_error(hub_env, tiny_folder, text_file, tmp_path, capsys):
    pytest.importorskip("hf_xet")
    import huggingface_hub.constants

    hub_env.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    with FakeHub(TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        hub_env.setenv("HF_TOKEN", TOKEN)
        out = tmp_path / "out"
        assert _run(tiny_folder, text_file, out, "--push-to-hub", "me/m") == 1
    err = capsys.readouterr().err.strip()
    assert "xet" in err.lower() and "complete and kept" in err and _complete(out)


def test_bad_repo_id_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "missing"), "--output", str(out), "--push-to-hub", "a/b/c"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err and not out.exists()
