"""Checkpoints by Hugging Face Hub id (offline, against a cache built here); `nanoseek push` (HfApi faked)."""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
import torch
import yaml
from conftest import cli, random_model

from nanoseek import CheckpointError, ModelConfig, load_model, save_model
from nanoseek.cli import main as cli_main
from nanoseek.engine import LLM, SamplingParams
from nanoseek.hub import HUB_PATTERNS, model_card, parse_hub_id, resolve_checkpoint
from nanoseek.tokenizer import copy_tokenizer

MAIN, BRANCH = "a" * 40, "b" * 40  # commit hashes of the two snapshots
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def add_snapshot(cache: Path, repo_id: str, src: Path, ref: str, commit: str) -> None:
    """huggingface_hub's cache layout: content-addressed blobs, snapshots/<commit>/ linking to them,
    refs/<ref> naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and any(Path(f.name).match(p) for p in HUB_PATTERNS):
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tiny_base, tmp_path, monkeypatch):
    """An offline Hub cache holding org/tiny: main is tiny_base, branch `dev` another model."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    other = tmp_path / "other"
    save_model(random_model(load_model(tiny_base).config), other)
    copy_tokenizer(tiny_base, other)
    add_snapshot(cache, "org/tiny", tiny_base, "main", MAIN)
    add_snapshot(cache, "org/tiny", other, "dev", BRANCH)
    return {"main": tiny_base, "dev": other, "cache": cache}


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parse_hub_id():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@dev") == ("org/name", "dev")
    assert parse_hub_id("deepseek-ai/DeepSeek-V3@refs/pr/1") == ("deepseek-ai/DeepSeek-V3", "refs/pr/1")
    for bad in ["name", "a/b/c", "/abs/dir", "./org/name", "org/na--me", "org/", "org/name@", "~/x"]:
        assert parse_hub_id(bad) is None, bad


def test_load_model_and_llm_by_hub_id_offline(hub):
    snap = resolve_checkpoint("org/tiny")
    assert snap.parent.name == "snapshots" and snap.name == MAIN
    assert sorted(p.name for p in snap.iterdir()) == MODEL_FILES  # no plots, metrics or training state
    assert same_weights(load_model("org/tiny"), load_model(hub["main"]))
    assert same_weights(load_model("org/tiny@dev"), load_model(hub["dev"]))
    assert not same_weights(load_model("org/tiny@dev"), load_model(hub["main"]))
    assert same_weights(load_model(f"org/tiny@{BRANCH}"), load_model(hub["dev"]))  # a commit hash works too
    llm = LLM("org/tiny")
    assert llm.tokenizer is not None
    want = LLM(hub["main"]).generate(["1+1="], SamplingParams(temperature=0, max_tokens=4))[0].token_ids
    assert llm.generate(["1+1="], SamplingParams(temperature=0, max_tokens=4))[0].token_ids == want


def test_a_local_directory_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub["dev"], tmp_path / "org" / "tiny")
    assert same_weights(load_model("org/tiny"), load_model(hub["dev"]))


def test_missing_ids_and_non_ids_fail_clearly(hub):
    with pytest.raises(CheckpointError, match=r"org/nothing.*HF_HUB_OFFLINE"):
        load_model("org/nothing")
    with pytest.raises(CheckpointError, match=r"org/tiny@nope.*HF_HUB_OFFLINE"):
        LLM("org/tiny@nope")
    with pytest.raises(CheckpointError, match=r"no/such/dir: not a checkpoint directory$"):
        load_model("no/such/dir")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(Path("org/nothing"))  # a Path is a local path, never a Hub id


def test_trainers_and_cli_take_hub_ids(hub, tmp_path):
    from nanoseek.train.grpo import GRPOConfig, GRPOTrainer
    from nanoseek.train.loop import TrainConfig

    cfg = GRPOConfig(task="arithmetic", group_size=2, prompts_per_step=2, eval_problems=2)
    trainer = GRPOTrainer("org/tiny@dev", cfg, TrainConfig(steps=1), tmp_path / "rl")
    assert same_weights(trainer.model, load_model(hub["dev"]).train())
    assert trainer.trainer.tokenizer_dir == resolve_checkpoint("org/tiny@dev")  # copied into its checkpoints
    r = cli("generate", "org/tiny", "--prompt", "1+1=", "--max-tokens", "2", env=os.environ)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("eval", "org/missing", "--task", "arithmetic@1", env=os.environ)
    assert r.returncode == 2 and "org/missing" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert "Traceback" not in r.stderr


# ---- push --------------------------------------------------------------------------------------
class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls, and what upload_folder would send."""

    calls: ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        sent = {
            p.name: p.read_bytes()
            for p in sorted(folder.iterdir())
            if any(Path(p.name).match(pat) for pat in kw["allow_patterns"])
        }
        self.calls.append(("upload_folder", kw["repo_id"], kw, sent))
        return "https://huggingface.co/org/tiny/commit/c0ffee"


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_sends_only_the_model_with_a_card(tiny_base, api, capsys):
    assert (tiny_base / "metrics.jsonl").exists()  # there, but not sent
    cli_main(
        ["push", str(tiny_base), "org/tiny", "--private", "--branch", "dev", "--commit-message", "first"]
    )
    (kind, repo, kw), (kind2, repo2, kw2), (kind3, repo3, up, sent) = api.calls
    assert (kind, repo, kw["private"], kw["exist_ok"]) == ("create_repo", "org/tiny", True, True)
    assert (kind2, repo2, kw2["branch"]) == ("create_branch", "org/tiny", "dev")
    assert (kind3, repo3, up["revision"]) == ("upload_folder", "org/tiny", "dev")
    assert up["commit_message"] == "first"
    assert sorted(sent) == ["README.md", *MODEL_FILES]
    for name in MODEL_FILES:
        assert sent[name] == (tiny_base / name).read_bytes(), name
    assert sent["README.md"].decode() == model_card(tiny_base, "org/tiny", revision="dev")
    assert "pushed" in capsys.readouterr().out
    assert not (tiny_base / "README.md").exists()  # the checkpoint directory is left as it was


def test_push_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, api):
    from nanoseek.hub import push

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        push(tmp_path / "run", "org/tiny")
    (tmp_path / "run" / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        push(tmp_path / "run", "org/tiny")
    with pytest.raises(ValueError, match="repo_id"):
        push(tmp_path / "run", "not a repo")
    assert api.calls == []


def test_model_card_of_a_grpo_run_with_metrics_and_evaluation(tiny_base, tmp_path):
    rl = tmp_path / "demo" / "rl"
    shutil.copytree(tiny_base, rl)
    run = {"task": "addition@2", "group_size": 8, "prompts_per_step": 16, "loss_type": "dapo", "beta": 0.0}
    (rl / "train_config.json").write_text(
        json.dumps({"step": 30, "train_config": {"lr": 1e-4, "seed": 0}, "run_config": run})
    )
    rows = [
        {
            "step": s,
            "loss": 0.1,
            "reward_mean": 0.5 + s / 100,
            "reward/accuracy": 0.4 + s / 100,
            "reward/format": 1.0,
            "accuracy": 0.4,
        }
        for s in (1, 2)
    ]
    rows[-1].update({"eval_greedy": 0.625, "eval_pass@1": 0.5})
    (rl / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = {"task": "addition@2", "rl": {"greedy": 0.71, "mean_len": 9.5}}
    (rl.parent / "summary.json").write_text(json.dumps(demo))
    card = model_card(rl, "org/tiny", license="mit")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["license"] == "mit"
    assert {"deepseek_v3", "nanoseek", "moe", "mtp", "grpo"} <= set(meta["tags"])
    config = ModelConfig.from_json(rl)
    assert "nanoseek preset `tiny`" in body
    assert f"{config.num_params():,}" in body and f"{config.num_active_params():,}" in body
    assert f"{config.num_mtp_params():,}" in body
    assert f"kv_lora_rank {config.kv_lora_rank}" in body and f"{config.n_routed_experts} routed" in body
    assert "Stage: GRPO" in body and "30 optimizer steps" in body and "group size 8" in body
    assert "reward/accuracy 0.42" in body
    assert "| addition@2 | greedy | 0.625 |" in body and "| addition@2 | pass@1 | 0.5 |" in body
    assert "| addition@2 | greedy | 0.71 |" in body  # the demo's summary row for this directory
    assert 'LLM("org/tiny")' in body and 'AutoModelForCausalLM.from_pretrained("org/tiny")' in body


def test_model_card_of_a_pretraining_run(tiny_base):
    card = model_card(tiny_base, "org/tiny")
    assert "license" not in card.split("---\n")[1]
    assert "Stage: pretraining" in card and "3 optimizer steps" in card and "preset tiny" in card
    last = json.loads((tiny_base / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"loss {last['loss']:.4g}" in card
