"""Recovery by distillation on tiny models: exact zeros kept (LoRA and full fine-tuning), structured
shapes and config unchanged, the loss going down, bitwise resume, and refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llmprune.__main__ import main
from llmprune.recover import RecoverCheckpoint, Settings, Work, learning_rate_at, train

from conftest import tiny_model

FAST = ["--eval-seqlen", "64", "--eval-tokens", "512", "--no-progress"]
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest (two threads on a busy machine wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RECOVER_FAST = ["--tokens", "256", "--seqlen", "32", "--batch", "2", "--curve-tokens", "128"]


def _pruned_pair(seed: int = 0):
    """(teacher, student): the student is the teacher with half of every decoder linear weight
    zeroed at random, and one of those zeros stored as -0.0 (its sign bit must survive too)."""
    teacher = tiny_model("llama", seed=seed)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, parameter in student.model.layers.named_parameters():
            if parameter.dim() == 2:
                parameter[torch.rand(parameter.shape, generator=generator) < 0.5] = 0.0
        student.model.layers[0].mlp.down_proj.weight[0, 0] = -0.0
    return teacher, student


def _windows(n: int = 16, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _zero_bits(model) -> dict:
    """name -> (positions of the zeros, their raw bits) of every decoder matrix."""
    out = {}
    for name, parameter in model.model.layers.named_parameters():
        if parameter.dim() == 2:
            zeros = parameter == 0
            out[name] = (zeros.clone(), parameter[zeros].view(torch.int32).clone())
    return out


@pytest.mark.parametrize("mode, lr", [("lora", 1e-2), ("full", 1e-3)])
def test_zeros_stay_exactly_zero(mode, lr):
    teacher, student = _pruned_pair()
    before = _zero_bits(student)
    weights = {n: p.clone() for n, p in student.model.layers.named_parameters()}
    settings = Settings(mode=mode, lr=lr, rank=4, alpha=8, seqlen=32, batch=2, warmup=0.0, tokens=4 * 64)
    merged, report = train(Work(student, teacher, _windows(8), progress=False), settings)
    after = _zero_bits(merged)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name][0], after[name][0]), name       # same positions
        assert torch.equal(before[name][1], after[name][1]), name       # same bits (-0.0 kept)
    changed = [n for n, p in merged.model.layers.named_parameters() if not torch.equal(p, weights[n])]
    assert len(changed) >= 7  # it trained: the nonzero weights moved
    assert type(merged).__name__ == "LlamaForCausalLM"  # LoRA merged away
    assert report["steps"] == 4 and report["tokens"] == 4 * 64


def test_student_learns_to_imitate_its_teacher():
    """A random student and a confident random teacher on four windows seen again and again: the
    KL to the teacher falls, and the held-out perplexity (of those windows) moves to the teacher's."""
    teacher = tiny_model("llama", seed=0)
    student = tiny_model("llama", seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    windows = _windows(4).repeat(24, 1)
    settings = Settings(mode="full", lr=1e-2, seqlen=32, batch=2, warmup=0.1, tokens=96 * 32, curve_every=12)
    _, report = train(Work(student, teacher, windows, windows[:4].flatten(), eval_seqlen=64, progress=False),
                      settings)
    curve = report["curve"]
    assert [p["tokens"] for p in curve] == [0, 768, 1536, 2304, 3072]
    losses = [p["train_loss"] for p in curve[1:]]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.6 * losses[0]
    gap = [abs(p["perplexity"] - report["teacher_perplexity"]) for p in curve]
    assert gap[-1] < 0.8 * gap[0]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_interrupted_and_resumed_run_ends_bitwise_equal(tmp_path, mode):
    settings = Settings(mode=mode, lr=5e-3, rank=4, dropout=0.1, seqlen=32, batch=2, tokens=6 * 64,
                        checkpoint_every=2)
    teacher, student = _pruned_pair()
    evaluation = _windows(4, seed=5).flatten()
    reference, _ = train(Work(copy.deepcopy(student), teacher, _windows(12), evaluation, 64, progress=False),
                         settings)

    def stop_at_3(step):
        if step == 3:
            raise KeyboardInterrupt

    fingerprint = {"run": "test"}
    with pytest.raises(KeyboardInterrupt):
        train(Work(copy.deepcopy(student), teacher, _windows(12), evaluation, 64, progress=False,
                   checkpoint=RecoverCheckpoint(tmp_path / "ck", fingerprint), on_step=stop_at_3), settings)
    checkpoint = RecoverCheckpoint(tmp_path / "ck", fingerprint)
    assert checkpoint.load()["meta"]["state"]["step"] == 2  # the last commit before the interruption
    resumed, report = train(Work(copy.deepcopy(student), teacher, _windows(12), evaluation, 64, progress=False,
                                 checkpoint=checkpoint), settings)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [p["tokens"] for p in report["curve"]] == [0, 64, 128, 192, 256, 320, 384]
    assert len(list((tmp_path / "ck").glob("layer-*.safetensors"))) == 1  # one file, replaced at each commit


def test_bf16_autocast_on_cpu_trains_and_keeps_float32_weights_and_zeros():
    """--recover-mixed-precision bf16 on the CPU: the forward runs under CPU autocast (the logits
    come out bfloat16 while training), the weights stay float32 (AdamW on float32 master weights,
    the LoRA delta merged in float32), the zeros keep their bits, the KL falls, and the merged
    model computes in float32 again (no autocast left in its forward)."""
    teacher, student = _pruned_pair()
    with torch.no_grad():  # a confident model and its pruned copy: something to learn
        teacher.lm_head.weight.mul_(10)
        student.lm_head.weight.mul_(10)
    before = _zero_bits(student)
    seen = []
    hook = student.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    windows = _windows(4).repeat(8, 1)
    settings = Settings(mode="lora", lr=1e-2, rank=4, alpha=8, seqlen=32, batch=2, warmup=0.1, tokens=32 * 32,
                        curve_every=4, mixed_precision="bf16")
    merged, report = train(Work(student, teacher, windows, windows[:4].flatten(), eval_seqlen=64, progress=False),
                           settings)
    hook.remove()
    assert report["mixed_precision"] == "bf16"
    assert torch.bfloat16 in seen  # the training forward was autocast
    losses = [p["train_loss"] for p in report["curve"][1:]]  # measured 0.568, 0.250, 0.152, 0.111
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    gap = [abs(p["perplexity"] - report["teacher_perplexity"]) for p in report["curve"]]
    assert gap[-1] < 0.5 * gap[0]  # the held-out perplexity moves to the teacher's (measured 200 -> 3)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    after = _zero_bits(merged)
    for name in before:
        assert torch.equal(before[name][0], after[name][0]) and torch.equal(before[name][1], after[name][1]), name
    ids = windows[:1]
    with torch.no_grad():
        assert merged(ids).logits.dtype == torch.float32
        fresh = tiny_model("llama")
        fresh.load_state_dict(merged.state_dict())
        assert torch.equal(merged(ids).logits, fresh(ids).logits)


def test_mixed_precision_auto_is_none_on_cpu_and_fp16_needs_cuda():
    from llmprune.errors import UsageError
    from llmprune.recover import mixed_precision

    cpu = torch.device("cpu")
    assert [mixed_precision(Settings(mixed_precision=m), cpu) for m in ("auto", "no", "bf16")] == ["no", "no", "bf16"]
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        mixed_precision(Settings(mixed_precision="fp16"), cpu)


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate_at(s, 10, 1.0, 0.2) for s in range(10)]
    assert rates[:2] == [0.5, 1.0] and rates[2] == 1.0
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])) and rates[-1] < 0.05


def _prune(folder, text_file, output, *extra):
    return main(["--model", str(folder), "--calib-data", str(text_file), "--eval-data", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--output", str(output), *FAST, *extra])


def _recover(folder, teacher, text_file, output, *extra):
    return main(["recover", str(folder), "--teacher", str(teacher), "--data", str(text_file),
                 "--eval-data", str(text_file), "--output", str(output), *RECOVER_FAST, *FAST, *extra])


def _shapes(folder) -> dict:
    from safetensors.torch import load_file

    return {k: tuple(v.shape) for k, v in load_file(str(folder / "model.safetensors")).items()}


def _config(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}


@pytest.mark.parametrize("allocation, extra", [("uniform", ["--layers", "1"]), ("global", [])])
def test_structured_student_keeps_shapes_and_config(tiny_folder, text_file, tmp_path, capsys, allocation, extra):
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert _prune(tiny_folder, text_file, pruned, "--method", "structured", "--heads", "0.5", "--ffn", "0.25",
                  "--allocation", allocation, "--no-speed", *extra) == 0
    assert _recover(pruned, tiny_folder, text_file, recovered, "--mode", "full", "--hidden", "1") == 0
    assert _shapes(pruned) == _shapes(recovered)
    assert _config(pruned) == _config(recovered)
    report = json.loads((recovered / "llmprune.json").read_text())
    stage = report["stages"][0]["report"]
    assert stage["zeros_unchanged"] and len(stage["curve"]) >= 2
    assert (recovered / "recovery.png").stat().st_size > 1000
    assert "## Recovery" in (recovered / "README.md").read_text()
    if extra:  # layers removed: the hidden-state pairs skip the removed teacher layer
        removed = json.loads((pruned / "llmprune.json").read_text())["stages"][0]["report"]["removed_layers"]
        assert [t for _, t in stage["pairs"]] == [i for i in range(3) if i not in removed]
    from llmprune.models.loading import load_model

    model, _ = load_model(str(recovered))  # loads as its input did (uneven layers: llmprune's classes)
    assert type(model).__name__ == type(load_model(str(pruned))[0]).__name__


def test_prune_run_with_recover_tokens(tiny_folder, text_file, tmp_path, capsys):
    output = tmp_path / "out"
    assert _prune(tiny_folder, text_file, output, "--method", "wanda", "--sparsity", "0.5", "--recover-tokens", "256",
                  "--recover-seqlen", "32", "--recover-batch", "2", "--recover-curve-tokens", "128",
                  "--recover-gradient-checkpointing") == 0
    report = json.loads((output / "llmprune.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["unstructured", "recover"]
    recover = report["stages"][1]["report"]
    assert recover["teacher"] == str(tiny_folder)
    assert recover["zeros_before"] == recover["zeros_after"] and recover["zeros_unchanged"]
    assert abs(recover["zeros_after"]["sparsity"] - 0.5) < 0.01
    printed = capsys.readouterr().out
    assert "zeros" in printed and "unchanged" in printed


def test_recover_command_with_bf16_on_cpu(tiny_folder, text_file, tmp_path, capsys):
    """`recover FOLDER --mixed-precision bf16 --device cpu`: recorded as bf16, the zeros of the
    Wanda student where they were, the saved weights float32 like the student's."""
    from safetensors.torch import load_file

    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert _prune(tiny_folder, text_file, pruned, "--method", "wanda", "--sparsity", "0.5") == 0
    assert _recover(pruned, tiny_folder, text_file, recovered, "--mixed-precision", "bf16", "--device", "cpu",
                    "--lr", "1e-2") == 0
    stage = json.loads((recovered / "llmprune.json").read_text())["stages"][0]["report"]
    assert stage["mixed_precision"] == "bf16" and stage["settings"]["mixed_precision"] == "bf16"
    assert stage["zeros_unchanged"] and stage["zeros_before"] == stage["zeros_after"]
    assert "bf16 autocast" in capsys.readouterr().out and "bf16 autocast" in (recovered / "README.md").read_text()
    assert all(math.isfinite(p["perplexity"]) for p in stage["curve"])
    assert stage["curve"][-1]["perplexity"] < 2 * stage["curve"][0]["perplexity"]
    student, saved = (load_file(str(folder / "model.safetensors")) for folder in (pruned, recovered))
    assert {v.dtype for v in saved.values()} == {v.dtype for v in student.values()} == {torch.float32}
    changed = [k for k in student if ".layers." in k and not torch.equal(student[k], saved[k])]
    assert changed and all(torch.equal(student[k] == 0, saved[k] == 0) for k in changed)


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "--rank must be an integer >= 1"),
    (["--lr", "0"], "--lr must be a number > 0"),
    (["--tokens", "0"], "--tokens must be an integer >= 1"),
    (["--kl", "0"], "needs a loss"),
    (["--targets", "qkv_proj"], "no module named qkv_proj"),
    (["--batch", "100000", "--seqlen", "100000"], "estimated peak memory of the recovery"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
])
def test_bad_options_are_refused(tiny_folder, text_file, tmp_path, capsys, extra, message):
    assert _recover(tiny_folder, tiny_folder, text_file, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [({"vocab_size": 300}, "vocabulary"),
                                                ({"hidden_size": 32, "head_dim": 8}, "hidden size")])
def test_teacher_that_cannot_teach_is_refused(tiny_folder, tokenizer, text_file, tmp_path, capsys, overrides, message):
    teacher = tmp_path / "teacher"
    tiny_model("llama", **overrides).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    assert _recover(tiny_folder, teacher, text_file, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_other_tokenizer_and_non_model_folder_are_refused(tiny_folder, tokenizer, text_file, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["zzzqqq"])
    other.save_pretrained(teacher)
    assert _recover(tiny_folder, teacher, text_file, tmp_path / "out") == 2
    assert "another tokenizer" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _recover(tmp_path / "empty", tiny_folder, text_file, tmp_path / "out") == 2
    assert "not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recipe_recover_stage(tiny_folder, text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_folder}\ncalib_data: [{text_file}]\neval_data: [{text_file}]\nnsamples: 4\n"
                      "seqlen: 32\neval_seqlen: 64\neval_tokens: 512\nstages:\n  - {method: wanda, sparsity: 0.5}\n"
                      "  - {method: recover, recover_tokens: 128, recover_seqlen: 32, recover_batch: 2, "
                      "recover_mode: full}\n")
    assert main(["--recipe", str(recipe), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "llmprune.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["unstructured", "recover"]
    assert report["stages"][1]["report"]["settings"]["mode"] == "full"
    assert report["stages"][1]["report"]["zeros_unchanged"]


def _decoder_weights(folder) -> dict:
    """name -> tensor of every decoder linear weight of a saved folder."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in tensors.items() if ".layers." in k and k.endswith("proj.weight")}


def _launch(arguments: list, cwd, processes: int = 2):
    """python -m accelerate.commands.launch --num_processes N -m llmprune ARGUMENTS (gloo on CPU,
    one thread each); the launcher and its workers are killed together if they outlive the timeout
    (a hung collective would otherwise leave the workers running)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", "0", "-m", "llmprune", *arguments]
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"accelerate launch did not finish in 240 s: {err[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_processes_read_disjoint_windows_that_together_make_one_process_batch():
    """window_rows: with W processes of ``batch`` windows, every micro-batch of every step reads, over
    the ranks in order, exactly the rows one process with W x batch windows per micro-batch reads."""
    from llmprune.recover import window_rows

    for world, batch, accumulation in [(2, 2, 1), (2, 3, 2), (4, 1, 3)]:
        many, one = Settings(batch=batch, accumulation=accumulation), Settings(batch=batch * world,
                                                                              accumulation=accumulation)
        read = []
        for step in range(3):
            for micro in range(accumulation):
                ranks = [range(40)[window_rows(step, micro, rank, world, many)] for rank in range(world)]
                together = [i for rows in ranks for i in rows]
                assert together == list(range(40)[window_rows(step, micro, 0, 1, one)])
                read += together
        assert read == list(range(3 * batch * accumulation * world))  # disjoint, in order, none skipped


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_recover_as_one(tiny_folder, text_file, tmp_path):
    """accelerate launch with 2 gloo processes on CPU, --batch 2 each, against one process with
    --batch 4: every optimiser step reads the same 4 windows (rank r takes the r-th pair), and
    DDP averages the two per-process mean gradients, which is the mean over the 4 windows. Only
    the summation order differs (two means of 2 windows averaged, not one mean of 4), so the
    weights agree to float32 round-off as amplified by AdamW, not to the bit."""
    pruned = tmp_path / "pruned"
    assert _prune(tiny_folder, text_file, pruned, "--method", "wanda", "--sparsity", "0.5") == 0
    common = ["recover", str(pruned), "--teacher", str(tiny_folder), "--data", str(text_file), "--eval-data",
              str(text_file), "--tokens", "512", "--seqlen", "32", "--lr", "1e-2", "--curve-every", "2",
              "--curve-tokens", "128", *FAST]
    assert main([*common, "--batch", "4", "--output", str(tmp_path / "one")]) == 0
    done = _launch([*common, "--batch", "2", "--output", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("llmprune summary") == 1  # only the main process reports and writes
    reports = [json.loads((tmp_path / name / "llmprune.json").read_text())["stages"][0]["report"]
               for name in ("one", "two")]
    assert [r["processes"] for r in reports] == [1, 2] and [r["steps"] for r in reports] == [4, 4]
    assert reports[1]["zeros_unchanged"]
    student, one, two = (_decoder_weights(tmp_path / name) for name in ("pruned", "one", "two"))
    assert student.keys() == one.keys() == two.keys()
    for name in student:
        assert torch.equal(student[name] == 0, two[name] == 0), name  # the same zeros, at the same places
        assert not torch.equal(student[name], two[name]), name  # and it trained
    # |one - two| against how far training moved the weights
    worst = max(float((one[k] - two[k]).abs().max() / (one[k] - student[k]).abs().max()) for k in one)
    assert worst < 2e-4  # measured 4.8e-5; 1.85 when both ranks read the same windows
    curves = [r["curve"] for r in reports]  # the curve too, its train loss over all 4 windows of a step
    assert [p["tokens"] for p in curves[0]] == [p["tokens"] for p in curves[1]] == [0, 256, 512]
    for a, b in zip(*curves):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
        assert a["train_loss"] == (None if b["train_loss"] is None else pytest.approx(b["train_loss"], rel=1e-4))
