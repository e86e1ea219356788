"""`python -m llmprune eval`: perplexity with the declared protocol, speed, lm-evaluation-harness tasks
(in process, and lm_eval's own `hf` model type on an llmprune output folder), and the `evaluate`
module loaded offline from its local path."""

from __future__ import annotations

import json

import pytest

from llmprune.__main__ import main

TASK_ROWS = [
    {"question": "Emma was handsome, clever and", "choices": [" rich", " purple", " seven"], "answer": 0},
    {"question": "It is a truth universally", "choices": [" acknowledged", " banana"], "answer": 0},
    {"question": "Miss Woodhouse was", "choices": [" pleased", " table", " never"], "answer": 1},
    {"question": "The weather was", "choices": [" fine", " hexagon"], "answer": 1},
    {"question": "She had a", "choices": [" sister", " the", " of"], "answer": 2},
]


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory, tokenizer, text_file_module):
    """An llmprune output folder (tiny Llama, Wanda 50%), measured on 256 tokens in 64-token windows."""
    from conftest import tiny_model

    base = tmp_path_factory.mktemp("evalcli")
    tiny_model("llama").save_pretrained(base / "tiny")
    tokenizer.save_pretrained(base / "tiny")
    out = base / "pruned"
    assert main(["--model", str(base / "tiny"), "--calib-data", str(text_file_module), "--eval-data",
                 str(text_file_module), "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64",
                 "--eval-tokens", "256", "--output", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def text_file_module(tmp_path_factory):
    from conftest import write_text_sample

    return write_text_sample(tmp_path_factory.mktemp("text") / "text.txt")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """A local multiple-choice lm_eval task over a local JSON file: runs offline."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in TASK_ROWS) + "\n")
    (folder / "austen_choice.yaml").write_text(
        "task: austen_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def test_eval_perplexity_is_the_pruning_runs_own(pruned_folder, text_file_module, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(pruned_folder), "--data", str(text_file_module), "--seqlen", "64", "--tokens", "256",
                 "--json", str(out), "--no-progress"]) == 0
    measured = json.loads(out.read_text())["perplexity"]
    reported = json.loads((pruned_folder / "llmprune.json").read_text())["perplexity"]["pruned"]
    assert measured["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-6)
    assert measured["protocol"] == reported["protocol"]
    assert json.loads(out.read_text())["parameters"]["zeros"] > 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_speed(pruned_folder, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(pruned_folder), "--data", "none", "--speed", "--json", str(out), "--no-progress"]) == 0
    speed = json.loads(out.read_text())["speed"]
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert "perplexity" not in json.loads(out.read_text())


def test_eval_tasks_need_lm_eval(pruned_folder, monkeypatch, capsys):
    import llmprune.harness

    monkeypatch.setattr(llmprune.harness, "lm_eval_available", lambda: False)
    assert main(["eval", str(pruned_folder), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install lm_eval" in err


def test_eval_bad_input(pruned_folder, capsys):
    assert main(["eval", str(pruned_folder), "--data", "none"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert main(["eval"]) == 2


@pytest.mark.slow
def test_lm_eval_tasks_in_process_and_hf_model_type_agree(pruned_folder, task_folder, tmp_path, monkeypatch):
    import lm_eval  # in the test extra: a missing package is a failure, not a skip
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval.json"
    assert main(["eval", str(pruned_folder), "--data", "none", "--tasks", "austen_choice", "--include-path",
                 str(task_folder), "--trust-remote-code", "--json", str(out), "--no-progress"]) == 0
    ours = json.loads(out.read_text())["tasks"]["austen_choice"]
    assert ours["sample_len"] == len(TASK_ROWS) and 0 <= ours["acc,none"] <= 1
    # lm_eval's own `hf` model type loads the llmprune output folder by path.
    from lm_eval.tasks import TaskManager

    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={pruned_folder},dtype=float32",
                                     tasks=["austen_choice"], task_manager=TaskManager(include_path=str(task_folder)),
                                     device="cpu", batch_size=1)
    assert theirs["results"]["austen_choice"]["acc,none"] == pytest.approx(ours["acc,none"])
    # and the loaded model really is the pruned one: same zeros as in the folder
    assert json.loads((pruned_folder / "llmprune.json").read_text())["prune"]["overall_sparsity"] > 0.45


def test_evaluate_module_loads_offline_and_matches(pruned_folder, text_file_module, monkeypatch):
    import evaluate  # in the test extra
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    import llmprune.metrics

    metric = evaluate.load(llmprune.metrics.PERPLEXITY)
    text = text_file_module.read_text()
    result = metric.compute(predictions=[text], model_id=str(pruned_folder), seqlen=64, max_tokens=256, device="cpu")
    reported = json.loads((pruned_folder / "llmprune.json").read_text())["perplexity"]["pruned"]
    assert result["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-6)
    assert result["predicted_tokens"] == reported["predicted_tokens"]
