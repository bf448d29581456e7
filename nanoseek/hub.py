"""The Hugging Face Hub: checkpoints named by repo id, and `nanoseek push` with a generated model card.

Wherever a checkpoint directory is taken, `org/name` or `org/name@revision` also works: the model's files
are fetched with `huggingface_hub.snapshot_download` (its cache, `HF_HUB_OFFLINE` and `HF_TOKEN` apply).
A local directory always wins over a Hub id of the same spelling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, _weight_files
from .config import PRESETS, ModelConfig

# what a checkpoint needs, and nothing else (no optimizer state, plots or logs)
HUB_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"({_PART}/{_PART})(?:@([^\s@]+))?")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `org/name[@revision]`, or None when `spec` cannot be a Hub model id."""
    m = _REPO_ID.fullmatch(spec)
    if m is None or "--" in m.group(1) or ".." in m.group(1):
        return None
    return m.group(1), m.group(2)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str | None:
    """The cache the environment names now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory as is, or the local snapshot of a Hub id `org/name[@revision]`.

    Raises CheckpointError naming the argument when it is neither an existing directory nor a model that
    can be fetched (or, under HF_HUB_OFFLINE, found in the cache).
    """
    path = Path(path_or_id)
    if path.is_dir():
        return path
    parsed = parse_hub_id(path_or_id) if isinstance(path_or_id, str) else None
    if parsed is None:
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return _download(path_or_id, *parsed)


def _download(spec: str, repo_id: str, revision: str | None) -> Path:
    where = f"{spec}: not a checkpoint directory, and as a Hugging Face Hub model id"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{where} it needs huggingface_hub (pip install huggingface_hub)") from None
    offline = _offline()
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(HUB_PATTERNS),
            cache_dir=_cache_dir(),
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        if offline:
            cache = _cache_dir() or "the default cache"
            raise CheckpointError(
                f"{where} it is not in the local cache ({cache}) and HF_HUB_OFFLINE is "
                "set: download it once online, or unset HF_HUB_OFFLINE"
            ) from None
        raise CheckpointError(f"{where} it is not cached and the Hub could not be reached") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: revision {revision!r} not found in {repo_id}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such repository, or it is private or gated "
            "(set HF_TOKEN to a token that may read it)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{where}: download failed ({e})") from None
    path = Path(snapshot)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{spec}: the Hub repository has no config.json; not a model checkpoint")
    return path


# ---- push ----------------------------------------------------------------------------------------
def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint directory that make the model: config, weights, index, tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    ModelConfig.from_json(path)  # a config that does not parse is refused before any upload
    files = [path / "config.json", *_weight_files(path)]
    files += [
        path / n
        for n in (
            "model.safetensors.index.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        )
        if (path / n).exists()
    ]
    return files


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
) -> Any:
    """Upload a checkpoint directory (model, tokenizer, config) with a generated README.md model card.

    Creates the repository (and the branch `revision`) when missing; the token is huggingface_hub's
    (HF_TOKEN or a saved login). Returns what `HfApi.upload_folder` returns (the commit's info).
    """
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise ValueError(f"repo_id: expected org/name, got {repo_id!r}")
    files = checkpoint_files(path)
    card = model_card(path, repo_id, license=license, revision=revision)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ValueError("push: needs huggingface_hub (pip install huggingface_hub)") from None
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    # the upload is a folder holding only the model's files and the card: the checkpoint directory is left
    # as it is, and nothing else in it (optimizer state, logs, plots) can be sent by mistake
    with tempfile.TemporaryDirectory(prefix="nanoseek-push-") as tmp:
        staged = Path(tmp)
        for f in files:
            _link(f.resolve(), staged / f.name)
        (staged / "README.md").write_text(card, encoding="utf-8")
        names = sorted(p.name for p in staged.iterdir())
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staged),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {Path(path).name} with nanoseek",
            allow_patterns=names,
        )


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


# ---- the model card --------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _training_meta(path: Path) -> dict:
    """What the training loop recorded about the run that made this directory: train_config.json (a
    finished run), else the training state of a checkpoints/step-N directory."""
    meta = _read_json(path / "train_config.json")
    if isinstance(meta, dict):
        return meta
    state = path / "training_state.safetensors"
    if state.exists():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(state), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("json", "{}"))
        except (SafetensorError, OSError, ValueError):  # a card is best effort: this section is lost, no more
            return {}
        if isinstance(meta, dict):
            return {k: meta[k] for k in ("step", "train_config", "run_config") if k in meta}
    return {}


def _stage(run_config: dict, path: Path) -> str:
    if "group_size" in run_config:
        return "GRPO (reinforcement learning with verifiable rewards)"
    if (path / "distill_summary.json").exists():
        return "distillation (SFT on verified teacher samples)"
    if "strict" in run_config:
        return "supervised fine-tuning"
    if run_config.get("init"):
        return "continued pretraining"
    return "pretraining"


def _preset_name(config: ModelConfig) -> str | None:
    """The preset whose architecture this is (vocabulary and special tokens aside), if any."""
    skip = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "extra"}
    mine = {k: v for k, v in config.to_dict().items() if k not in skip}
    for name in PRESETS:
        theirs = {k: v for k, v in ModelConfig.preset(name).to_dict().items() if k not in skip}
        if all(mine.get(k) == v for k, v in theirs.items()):
            return name
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(
    path: str | os.PathLike, repo_id: str, *, license: str | None = None, revision: str | None = None
) -> str:
    """A README.md for the Hub: YAML metadata, architecture, parameter counts, training and evaluation as
    far as the directory records them, and how to load the model."""
    path = Path(path)
    config = ModelConfig.from_json(path)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    tags = (
        ["deepseek_v3", "nanoseek", "mla"]
        + (["moe"] if moe_layers else [])
        + (["mtp"] if config.num_nextn_predict_layers else [])
    )
    meta = _training_meta(path)
    run, train = meta.get("run_config") or {}, meta.get("train_config") or {}
    if "group_size" in run:
        tags.append("grpo")
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if license:
        front.append(f"license: {license}")
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]

    name = repo_id.split("/")[-1]
    preset = _preset_name(config)
    lines = [
        f"# {name}",
        "",
        (
            "A DeepSeek-V3-architecture language model made with nanoseek (DeepSeek-V3/R1 in miniature): "
            "Multi-head Latent Attention, DeepSeekMoE with auxiliary-loss-free balancing and multi-token "
            "prediction, in the public DeepSeek-V3 checkpoint format."
        ),
        "",
        "## Architecture",
        "",
    ]
    if preset:
        lines += [
            f"nanoseek preset `{preset}`"
            + (" (vocabulary resized)" if config.vocab_size != ModelConfig.preset(preset).vocab_size else "")
            + ".",
            "",
        ]
    q = f"q_lora_rank {config.q_lora_rank}" if config.q_lora_rank else "no query compression"
    dense_layers = config.num_hidden_layers - moe_layers
    rows = [
        ("layers", f"{config.num_hidden_layers} ({dense_layers} dense, {moe_layers} MoE)"),
        ("hidden size", config.hidden_size),
        (
            "attention",
            (
                f"MLA, {config.num_attention_heads} heads; kv_lora_rank {config.kv_lora_rank}, "
                f"{q}; qk_nope/qk_rope/v head dims {config.qk_nope_head_dim}/"
                f"{config.qk_rope_head_dim}/{config.v_head_dim}"
            ),
        ),
    ]
    if moe_layers:
        rows.append(
            (
                "experts",
                (
                    f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok} per "
                    f"token within the best {config.topk_group} of {config.n_group} groups) + "
                    f"{config.n_shared_experts} shared, width {config.moe_intermediate_size}"
                ),
            )
        )
    rows += [
        ("dense FFN width", config.intermediate_size),
        (
            "multi-token prediction",
            f"{config.num_nextn_predict_layers} module(s)" if config.num_nextn_predict_layers else "none",
        ),
        ("vocabulary", config.vocab_size),
        ("context", config.max_position_embeddings),
    ]
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += [
        "## Parameters",
        "",
        f"- total: {config.num_params():,} (main model)",
        f"- activated per token: {config.num_active_params():,}",
        f"- multi-token prediction modules: {config.num_mtp_params():,}",
        "",
    ]

    records = _metrics(path / "metrics.jsonl")
    summary = _read_json(path / "pretrain_summary.json")
    summary = summary if isinstance(summary, dict) else {}
    if meta or records:
        lines += ["## Training", ""]
        lines.append(f"Stage: {_stage(run, path)}, with nanoseek.")
        steps = meta.get("step") or (records[-1].get("step") if records else None)
        facts = []
        if steps:
            facts.append(f"{steps} optimizer steps")
        for key, label in (
            ("lr", "peak learning rate"),
            ("schedule", "schedule"),
            ("precision", "precision"),
            ("seed", "seed"),
        ):
            if key in train:
                facts.append(f"{label} {_fmt(train[key])}")
        for key, label in (
            ("task", "task"),
            ("preset", "preset"),
            ("data", "data"),
            ("seq_len", "sequence length"),
            ("batch_size", "batch size"),
            ("group_size", "group size"),
            ("prompts_per_step", "prompts per step"),
            ("loss_type", "loss"),
            ("beta", "KL beta"),
        ):
            if key in run:
                facts.append(f"{label} {_fmt(run[key])}")
        if summary.get("cost", {}).get("tokens"):
            facts.append(f"{summary['cost']['tokens']:,} tokens")
        if facts:
            lines.append("; ".join(facts) + ".")
        if records:
            last = records[-1]
            shown = ("loss", "mtp_loss", "val_loss", "reward_mean", "accuracy", "format_rate", "mean_len")
            final = [
                (k, v)
                for k, v in last.items()
                if (k in shown or k.startswith("reward/")) and isinstance(v, (int, float))
            ]
            if final:
                lines += [
                    "",
                    f"At the last step ({last.get('step')}): "
                    + ", ".join(f"{k} {_fmt(v)}" for k, v in final)
                    + ".",
                ]
        lines.append("")

    evals = _evaluations(path, records, summary)
    if evals:
        lines += [
            "## Evaluation",
            "",
            "Held-out problems, never trained on.",
            "",
            "| task | metric | value |",
            "|---|---|---|",
            *[f"| {t} | {m} | {_fmt(v)} |" for t, m, v in evals],
            "",
        ]

    at = f"{repo_id}@{revision}" if revision else repo_id
    rev = f', revision="{revision}"' if revision else ""
    lines += [
        "## Use",
        "",
        "With nanoseek:",
        "",
        "```python",
        "from nanoseek import LLM, SamplingParams",
        f'llm = LLM("{at}")',
        'print(llm.generate(["What is 12 + 7"], SamplingParams(temperature=0, max_tokens=64))[0].text)',
        "```",
        "",
        "```bash",
        f"nanoseek serve {at}   # OpenAI-compatible API and a chat page",
        "```",
        "",
        "With transformers (DeepseekV3ForCausalLM):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev})',
        "```",
        "",
    ]
    return "\n".join(front + lines)


def _evaluations(path: Path, records: list[dict], summary: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) rows: GRPO's last held-out evaluation, pretraining's held-out accuracy, and the
    demo's summary row for this directory."""
    rows: list[tuple[str, str, float]] = []
    run = _training_meta(path).get("run_config") or {}
    for r in reversed(records):
        ev = {k.removeprefix("eval_"): v for k, v in r.items() if k.startswith("eval_")}
        if ev:
            rows += [(run.get("task", "task"), k, v) for k, v in ev.items() if isinstance(v, (int, float))]
            break
    for task, res in (summary.get("accuracy") or {}).items():
        if isinstance(res, dict):
            rows += [(task, k, v) for k, v in res.items() if isinstance(v, (int, float))]
    demo = _read_json(path.parent / "summary.json")
    if isinstance(demo, dict) and isinstance(demo.get(path.name), dict):
        rows += [
            (demo.get("task", "task"), k, v)
            for k, v in demo[path.name].items()
            if isinstance(v, (int, float))
        ]
    return rows
