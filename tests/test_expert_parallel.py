"""Expert parallelism: the dispatcher against the local expert path (two gloo processes), and training under
torchrun with --expert-parallel against one process."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ONE_THREAD, TINY_PRETRAIN_FLAGS, TORCHRUN, cli, torchrun, weights

from nanoseek import ModelConfig
from nanoseek.model import MoE, RouterStats
from nanoseek.train.expert_parallel import ExpertParallel, check_expert_parallel

TINY = TINY_PRETRAIN_FLAGS
STEPS = ["--steps", "5", "--save-every", "2"]

# ---- the dispatcher, two processes -----------------------------------------------------------------
BASE = ModelConfig.preset("tiny").replace(hidden_size=16, moe_intermediate_size=8)
CASES = {  # name: (config, tokens on rank 0 and rank 1, expert bias on each rank (None: random routing))
    "uneven": (BASE.replace(n_group=1, topk_group=1), (3, 13), None),
    "top1": (BASE.replace(num_experts_per_tok=1, n_group=1, topk_group=1), (7, 5), None),
    "topk_is_experts_per_rank": (BASE.replace(num_experts_per_tok=4, n_group=1, topk_group=1), (6, 9), None),
    "group_limit": (BASE, (11, 4), None),  # 2 groups = 2 ranks, topk_group 1: a token reaches one rank
    "all_local": (BASE.replace(n_group=1, topk_group=1), (8, 6), "own"),
    "idle_receiver": (BASE.replace(n_group=1, topk_group=1), (8, 6), "rank0"),
    "one_token": (BASE.replace(n_group=1, topk_group=1), (1, 2), None),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_case(name: str, rank: int) -> dict:
    """The dispatcher's output and gradients against the local path over the same tokens; returns facts
    for the test to check."""
    config, tokens, bias = CASES[name]
    torch.manual_seed(0)
    ref = MoE(config)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        b = ref.gate.e_score_correction_bias
        if bias == "own":  # every token's experts on its own rank
            b[rank * 4 : (rank + 1) * 4] = 10.0
        elif bias == "rank0":  # every token's experts on rank 0: rank 1 receives nothing
            b[:4] = 10.0
    ep_moe = copy.deepcopy(ref)
    ep = ExpertParallel(ep_moe, 2, rank, 2)
    torch.manual_seed(100 + rank)
    x = torch.randn(1, tokens[rank], config.hidden_size)
    grad_out = torch.randn_like(x)
    outs, grads = [], []
    for m in (ref, ep_moe):
        xi = x.clone().requires_grad_()
        stats = RouterStats()
        y = m(xi, stats)
        (y * grad_out).sum().backward()
        outs.append((y.detach(), stats.load[0]))
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[1][1], outs[0][1])  # the router's load, from this rank's tokens
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep_moe.gate.weight.grad, ref.gate.weight.grad, rtol=1e-5, atol=1e-6)
    for attr in ("gate_up", "down"):
        # the holder's gradient sums every rank's tokens: the local path's, summed over the ranks
        want = getattr(ref.experts, attr).grad.clone()
        dist.all_reduce(want)
        got = getattr(ep_moe.experts, attr).grad
        got = torch.zeros_like(want[:4]) if got is None else got
        torch.testing.assert_close(got, want[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-6)
    sent = ep.step_metrics()
    with torch.no_grad():  # inference (a token or two take another path locally)
        ep_moe.eval()
        ref.eval()
        torch.testing.assert_close(ep_moe(x[:, :2]), ref(x[:, :2]), rtol=1e-5, atol=1e-6)
    ep.reduce_grads()  # an expert no token reached gets a zero gradient (not None), on every rank
    return {
        "bytes_per_token": sent["ep_a2a_bytes_per_token"],
        "no_limit": sent["ep_a2a_bytes_per_token_no_limit"],
        "grads": all(p.grad is not None for p in ep.params),
    }


def _dispatch_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))  # a hang fails
    results = {}
    for name in CASES:
        try:
            results[name] = _check_case(name, rank)
        except (AssertionError, RuntimeError, ValueError) as e:  # reported per case by the tests
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dispatch_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dispatch")
    mp.spawn(_dispatch_worker, args=(_free_port(), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_equals_local_experts(dispatch_results, case):
    for rank, results in enumerate(dispatch_results):
        assert "error" not in results[case], f"rank {rank}: {results[case].get('error')}"
        assert results[case]["grads"]


def test_tokens_whose_experts_are_local_send_nothing(dispatch_results):
    assert [r["all_local"]["bytes_per_token"] for r in dispatch_results] == [0.0, 0.0]
    assert all(r["uneven"]["bytes_per_token"] > 0 for r in dispatch_results)


def test_group_limit_bounds_the_ranks_a_token_reaches(dispatch_results):
    """Groups map to ranks (n_group = E = 2) and topk_group is 1: a token goes to at most one other rank,
    where without the limit its two experts may lie on both."""
    d, k = BASE.hidden_size, BASE.num_experts_per_tok
    row = (d + k) * 4 + k * 4 + d * 4  # dispatch row, its expert ids, combine row
    for r in dispatch_results:
        assert 0 < r["group_limit"]["bytes_per_token"] <= row
        assert r["group_limit"]["no_limit"] <= row


# ---- training under torchrun -------------------------------------------------------------------------
def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, and two with --expert-parallel 2, over the same global batches."""
    root = tmp_path_factory.mktemp("ep")
    r = cli("pretrain", *TINY, *STEPS, "--out", str(root / "one"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun("pretrain", *TINY, *STEPS, "--expert-parallel", "2", "--out", str(root / "ep"))
    return root


def test_two_processes_with_expert_parallel_match_one(runs):
    one, ep = runs / "one", runs / "ep"
    assert len(losses(ep)) == 5
    torch.testing.assert_close(torch.tensor(losses(ep)), torch.tensor(losses(one)), rtol=1e-5, atol=0)
    wa, wb = weights(one), weights(ep)  # the usual whole checkpoint, gathered from both ranks
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(wb[k], wa[k]), k
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    record = json.loads((ep / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["ep_a2a_bytes_per_token"] > 0 and record["ep_a2a_bytes_per_token_no_limit"] > 0


def test_kill_and_resume_under_expert_parallel(runs, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*TORCHRUN, "pretrain", *TINY, *STEPS, "--expert-parallel", "2", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ONE_THREAD,
        start_new_session=True,
    )
    try:
        while not (out / "checkpoints" / "step-0000002").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists()  # killed before the end
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    torchrun("pretrain", *TINY, *STEPS, "--expert-parallel", "2", "--resume", "--out", str(out))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]
    a, b = weights(runs / "ep"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint holds the whole model and optimizer state: one process without expert parallelism
    # resumes it too
    r = cli("pretrain", *TINY, *STEPS, "--resume", "--out", str(saved), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    c = weights(saved)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


# ---- bad input -----------------------------------------------------------------------------------
def test_expert_parallel_without_torchrun_is_refused_before_any_work(tmp_path):
    r = cli("pretrain", *TINY, "--steps", "1", "--expert-parallel", "2", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "--expert-parallel 2" in r.stderr and "torchrun" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "degree,world,config,fsdp,msg",
    [
        (3, 2, ModelConfig.preset("tiny"), False, "must divide the number of processes (2)"),
        (3, 3, ModelConfig.preset("tiny"), False, "must divide n_routed_experts (8)"),
        (2, 2, ModelConfig.preset("dense-small"), False, "no routed experts"),
        (2, 2, ModelConfig.preset("tiny"), True, "--fsdp"),
        (0, 2, None, False, "must be >= 1"),
    ],
)
def test_bad_expert_parallel_degrees(degree, world, config, fsdp, msg):
    with pytest.raises(ValueError, match="--expert-parallel") as e:
        check_expert_parallel(degree, world, config, fsdp)
    assert msg in str(e.value)
