import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ONE_THREAD, TINY_PRETRAIN_FLAGS, TORCHRUN, cli, require_cxx_compiler, torchrun, weights

from nanoseek import ModelConfig, load_model
from nanoseek.cost import training_cost
from nanoseek.model import DeepSeekV3
from nanoseek.train.loop import TrainConfig, lr_at
from nanoseek.train.pretrain import PretrainConfig, moe_gates, next_token_loss, pretrain, update_gate_biases

TINY = [*TINY_PRETRAIN_FLAGS, "--eval-problems", "2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = cli("pretrain", *TINY, "--steps", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_pretrain_writes_a_servable_checkpoint(reference_run):
    out = reference_run
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
        "loss.png",
        "expert_load.png",
        "pretrain_summary.json",
    ]:
        assert (out / f).exists(), f
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ["loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "load_max_mean_0", "tokens_per_s"]:
        assert key in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["cost"]["flops"] > 0 and "arithmetic" in summary["accuracy"]
    model = load_model(out)
    assert len(model.mtp) == 1
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<｜end▁of▁sentence｜>"


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Poll `ready()` while `proc` runs."""
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline and proc.poll() is None, "the run ended or stalled first"
        time.sleep(0.05)


def metric_lines(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def kill_after_checkpoint(out: Path, step: int) -> None:
    """An 8-step run saving every 2 steps, SIGKILLed once checkpoint `step` exists."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "pretrain",
            *TINY,
            "--steps",
            "8",
            "--save-every",
            "2",
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(proc, lambda: (out / "checkpoints" / f"step-{step:07d}").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_and_resume_is_bit_identical(reference_run, tmp_path):
    out = tmp_path / "run"
    kill_after_checkpoint(out, 4)
    r = cli("pretrain", *TINY, "--steps", "8", "--save-every", "2", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    a, b = weights(reference_run), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_reads_checkpoints_keyed_by_position(reference_run, tmp_path):
    """Earlier versions keyed the optimizer state by parameter position: such checkpoints still resume."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nanoseek.train.loop import STATE_FILE

    out = tmp_path / "run"
    kill_after_checkpoint(out, 2)
    path = sorted((out / "checkpoints").glob("step-*"))[-1] / STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["json"]), {k: f.get_tensor(k) for k in f.keys()}
    names = [n for g in meta["param_groups"] for n in g["params"]]
    old = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    for k, v in tensors.items():
        if k.startswith("optim."):
            param, key = k.removeprefix("optim.").rsplit(".", 1)
            old[f"optim.{names.index(param)}.{key}"] = v
    i = 0
    for g in meta["param_groups"]:
        g["params"], i = list(range(i, i + len(g["params"]))), i + len(g["params"])
    save_file(old, str(path), metadata={"json": json.dumps(meta)})
    r = cli("pretrain", *TINY, "--steps", "8", "--save-every", "2", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    a, b = weights(reference_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoseek.cli", "pretrain", *TINY, "--steps", "500", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(proc, lambda: len(metric_lines(out)) >= 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted" in stdout
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "training_state.safetensors").exists()


def test_resume_refuses_a_different_config(reference_run, tmp_path):
    out = tmp_path / "run"
    assert cli("pretrain", *TINY, "--steps", "2", "--save-every", "1", "--out", str(out)).returncode == 0
    r = cli(
        "pretrain", *[a if a != "64" else "32" for a in TINY], "--steps", "4", "--resume", "--out", str(out)
    )
    assert r.returncode == 2 and "seq_len" in r.stderr and "Traceback" not in r.stderr


def losses(out):
    return torch.tensor([json.loads(x)["loss"] for x in metric_lines(out)])


def test_two_gloo_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TINY, "--steps", "3", "--batch-size", "4"]
    assert cli("pretrain", *args, "--out", str(one)).returncode == 0
    torchrun("pretrain", *args, "--out", str(two))
    assert len(losses(one)) == len(losses(two)) == 3
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-4, atol=1e-5)


def test_exit_waits_for_collective_workers_to_free_reduced_tensors(monkeypatch):
    """A tensor a collective's worker still holds when the caller has dropped it must be freed before the
    interpreter finalises (freeing it needs the GIL): `Dist.all_reduce` tracks it and `_leave_group` waits
    for it. Stand-in for the worker: an autograd graph holding the tensor, dropped by a thread 0.2 s later."""
    import threading

    import nanoseek.train.loop as loop

    monkeypatch.setattr(loop, "_reduced", [])
    monkeypatch.setattr(loop.dist, "all_reduce", lambda t, op: None)
    held = torch.ones(2)
    assert loop.Dist(0, 2).all_reduce(held) is held and loop._reduced[-1]() is held
    box = [torch.ones(2, requires_grad=True) * held]  # C++ (the graph) now holds `held` too
    del held
    assert loop._reduced[-1]() is not None  # kept alive for C++, as a worker's tensor is
    threading.Timer(0.2, box.clear).start()
    loop._leave_group(timeout=30)
    assert loop._reduced[-1]() is None  # freed before it returned
    keep = torch.ones(1)  # still referenced from Python: it gives up at the timeout instead of hanging
    loop.Dist(0, 2).all_reduce(keep)
    loop._leave_group(timeout=0.2)
    assert loop._reduced == [loop._reduced[-1]] and loop._reduced[-1]() is keep


@pytest.mark.parametrize("fsdp,whom", [(False, "one rank"), (True, "process group")])
def test_ctrl_c_under_torchrun_saves_on_every_rank(tmp_path, fsdp, whom):
    """Ctrl-C in a terminal reaches every process of the group (and torchrun forwards it once more); a
    SIGINT may also reach one rank only. Either way the ranks agree to stop after the same step and save
    one checkpoint together, from which the run resumes."""
    out = tmp_path / "run"
    extra = ["--fsdp"] if fsdp else []
    proc = subprocess.Popen(
        [*TORCHRUN, "pretrain", *TINY, "--steps", "500", "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
        start_new_session=True,
    )
    wait_for(proc, lambda: len(metric_lines(out)) >= 2)
    if whom == "one rank":
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(workers[-1]), signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "interrupted" in stdout, stderr[-3000:]
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "training_state.safetensors").exists()
    step = int(ckpts[0].name.split("-")[1])
    torchrun("pretrain", *TINY, "--steps", str(step + 1), "--resume", "--out", str(out), *extra)
    assert [json.loads(x)["step"] for x in metric_lines(out)] == list(range(1, step + 2))


def test_fsdp_two_processes_save_resume_and_match_one(tmp_path):
    """FSDP2 shards parameters and optimizer state: checkpoints and the final model must be gathered whole,
    and a resumed run must continue exactly, matching one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TINY, "--batch-size", "4", "--save-every", "1"]
    assert cli("pretrain", *args, "--steps", "4", "--out", str(one)).returncode == 0
    torchrun("pretrain", *args, "--steps", "2", "--fsdp", "--out", str(two))  # leaves checkpoint step 1
    torchrun("pretrain", *args, "--steps", "4", "--fsdp", "--resume", "--out", str(two))
    assert len(losses(two)) == 4
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-4, atol=1e-5)
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--data", "missing.txt"], "no such data file"),
        (["--vocab-size", "100"], "vocab_size"),
        (["--seq-len", "4096"], "seq_len"),
        (["--batch-size", "3", "--grad-accum", "2"], "batch_size"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, args, msg):
    r = cli("pretrain", *TINY, *args, "--steps", "1", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = cli(
        "pretrain", *TINY, "--data", str(tmp_path / "empty.txt"), "--steps", "1", "--out", str(tmp_path / "r")
    )
    assert r.returncode == 2 and "empty" in r.stderr


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import nanoseek.train.loop as loop

    pc = PretrainConfig(
        preset="tiny", seq_len=64, batch_size=4, num_docs=400, vocab_size=400, eval_problems=2, eval_every=0
    )
    tc = TrainConfig(steps=6, save_every=2, warmup=1)
    calls = {"n": 0}
    real = loop.save_file

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(loop, "save_file", flaky)
    with pytest.raises(OSError, match="previous checkpoint is intact"):
        pretrain(pc, tc, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000002"]  # no half-written step-4, no temp directory left


@pytest.mark.parametrize("compiled", [False, True])
def test_next_token_loss_averages_kept_targets_inside_a_document(compiled):
    """The mean of -log p(ids[i + k]) over targets that are kept and in logits[:, i]'s document, against
    float64 by hand; compiled (as `--compile` trains) it agrees, gradient included."""
    if compiled:
        require_cxx_compiler()
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, requires_grad=True)
    ids = torch.randint(0, 5, (2, 8))
    keep = torch.rand(2, 8) > 0.3
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2]])
    loss_of = torch.compile(next_token_loss) if compiled else next_token_loss
    loss = loss_of(logits, ids, keep, seg, 2)
    logp = logits.detach().double().log_softmax(-1)
    terms = [
        -logp[b, i, ids[b, i + 2]]
        for b in range(2)
        for i in range(6)
        if keep[b, i + 2] and seg[b, i + 2] == seg[b, i]
    ]
    assert len(terms) > 2
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    plain = logits.detach().clone().requires_grad_()
    next_token_loss(plain, ids, keep, seg, 2).backward()
    torch.testing.assert_close(logits.grad, plain.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        loss_of(logits, ids, None, None, 1).double(),
        -logp[:, :6].gather(-1, ids[:, 1:7, None]).mean(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bias_update_moves_toward_mean_load():
    m = DeepSeekV3(ModelConfig.preset("tiny"))
    gates = moe_gates(m)
    load = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5]] * len(gates))
    update_gate_biases(m, load, 0.01)
    b = gates[0].e_score_correction_bias
    assert b[0] == pytest.approx(-0.01) and b[1] == pytest.approx(0.01) and b[2] == 0


def test_schedules():
    cos = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(99, cos) == pytest.approx(0.1, abs=0.01)
    wsd = TrainConfig(steps=100, lr=1.0, warmup=10, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.1)
    assert lr_at(50, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.55)


def test_cost_reproduces_v3_pretraining_row():
    c = training_cost(ModelConfig.preset("v3"), 14.8e12, "h800")
    assert abs(c.gpu_hours - 2664e3) / 2664e3 < 0.10
    assert abs(c.dollars - 5.328e6) / 5.328e6 < 0.10
    r = cli("cost", "--preset", "v3", "--tokens", "14.8e12", "--gpu", "h800")
    assert r.returncode == 0 and "GPU-hours" in r.stdout


def test_dense_equivalent_matches_activated_parameters():
    from nanoseek.train.pretrain import dense_equivalent

    moe = ModelConfig.preset("small")
    dense = dense_equivalent(moe)
    assert dense.n_routed_experts == 0 and not any(
        dense.is_moe_layer(i) for i in range(dense.num_hidden_layers)
    )
    assert abs(dense.num_active_params() - moe.num_active_params()) / moe.num_active_params() < 0.01


def test_a_step_that_compiled_freezes_the_heap_until_training_ends(tmp_path):
    """After a step that compiled, the objects alive are frozen (full collections would walk the graphs'
    objects again and again); when training ends they go back to the collector, cycles and all."""
    from conftest import random_model

    from nanoseek.kernels import unfreeze_heap
    from nanoseek.train.loop import Trainer

    unfreeze_heap()
    gc.unfreeze()
    model = random_model(ModelConfig.preset("tiny"))
    double = torch.compile(lambda x: x * 2 + 1, backend="eager")
    frozen = []

    def loss_fn(step: int, micro: int) -> tuple[torch.Tensor, dict]:
        frozen.append(gc.get_freeze_count())
        return double(model(torch.tensor([[1, 2, 3]]))).mean(), {}

    try:
        Trainer(model, TrainConfig(steps=2), tmp_path / "out").train(loss_fn, progress=False)
        assert frozen[0] == 0 and frozen[1] > 0 and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
