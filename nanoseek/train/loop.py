"""The one training loop shared by pretraining, SFT and GRPO.

It owns what every run needs: torch.distributed set-up (DDP by default, FSDP2 behind a flag; gloo on
CPU, nccl on CUDA), AdamW with decay on matrices only, warmup + cosine or warmup-stable-decay, gradient
accumulation and clipping, optional bf16 autocast, a progress bar and JSONL metrics on rank 0 (also sent
to TensorBoard / W&B with `report_to`),
checkpoints (HF weights + tokenizer + a safetensors training state) written atomically with the last few
kept, exact resume, and Ctrl-C that saves before exiting. The caller supplies a loss function.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import json
import math
import os
import shutil
import signal
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import atomic_write, atomic_write_text
from ..checkpoint import load_model, save_model
from ..config import option
from ..device import DEVICES, resolve_device
from ..fp8 import apply_fp8
from ..kernels import freeze_after_compiling, unfreeze_heap
from ..model import DeepSeekV3
from ..tokenizer import copy_tokenizer
from .expert_parallel import ExpertParallel, check_expert_parallel
from .report import Tracker, parse_report_to

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


@dataclass
class TrainConfig:
    steps: int = option(300, "optimizer steps")
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "the schedule ends at this fraction of --lr")
    warmup: int = option(20, "linear warm-up steps")
    schedule: str = option(
        "cosine",
        "cosine decay, or wsd: warmup, stable, then linear decay over the last --decay-frac of the steps",
        choices=("cosine", "wsd"),
    )
    decay_frac: float = option(0.2, "wsd: the share of steps that decays")
    weight_decay: float = option(0.1, "AdamW weight decay (not on norms, biases or embeddings)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    precision: str = option(
        "auto",
        "auto: bf16 on a GPU, fp32 on a CPU; bf16: autocast; fp8: FP8 GEMMs with block scaling, the rest in bf16",
        choices=PRECISIONS,
    )
    device: str = option("auto", f"where to train: {DEVICES} (auto: this process's GPU if there is one)")
    save_every: int = option(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(3, "step checkpoints kept on disk")
    seed: int = option(0, "random seed (data order, initialisation, sampling)")
    fsdp: bool = option(False, "under torchrun: FSDP2 (fully_shard) instead of DDP")
    max_seconds: float = option(0.0, "stop (and finish normally) after this much wall time (0: no limit)")
    compile: bool = option(False, "torch.compile the model's forward and backward (a minute to compile)")
    expert_parallel: int = option(
        1,
        "under torchrun: split each MoE layer's routed experts across E ranks "
        "(all-to-all dispatch); the process count must be a multiple of E",
    )
    report_to: str = option(
        "none",
        "also log metrics to: none, tensorboard (OUT/tensorboard), wandb, all, or a comma list (rank 0)",
    )

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule: must be 'cosine' or 'wsd', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lr <= 0 or self.grad_accum < 1:
            raise ValueError("lr must be > 0 and grad_accum >= 1")
        if self.expert_parallel < 1:
            raise ValueError(f"--expert-parallel: must be >= 1, got {self.expert_parallel}")
        parse_report_to(self.report_to)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio * lr, or constant then linear decay (WSD)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (step - decay_start) / max(cfg.steps - decay_start, 1)
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- distributed -------------------------------------------------------------------------------
# A collective's worker thread holds its tensors until it drops the finished work, which can be after the
# caller has dropped them; freeing them then needs the GIL, and a thread that asks for the GIL once the
# interpreter is finalising is killed, aborting the process ("terminate called without an active
# exception": about 3 two-process gloo runs in 100 here, at exit). Destroying the group joins its workers,
# which covers collectives issued anywhere (FSDP's too), but only if nothing else holds the group, and DDP's
# reducer does. So the tensors reduced here are tracked too, and the exit waits for the workers to free them.
_reduced: list[weakref.ref[Tensor]] = []


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.world > 1:
            t = t.to(self.device)  # nccl reduces only GPU tensors
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            _reduced[:] = [r for r in _reduced if r() is not None]
            _reduced.append(weakref.ref(t))
            if op == "mean":
                t /= self.world
        return t


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on CUDA), on `device` (see
    `nanoseek.device.resolve_device`; under torchrun, auto and cuda mean the local rank's GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.startswith("cuda:"):
        raise ValueError(
            f"device: {device!r} under torchrun; use --device cuda (each rank takes its LOCAL_RANK's GPU)"
        )
    resolved = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        atexit.register(_leave_group)
    return Dist(int(os.environ.get("RANK", "0")), world, resolved)


def _leave_group(timeout: float = 5.0) -> None:
    """At exit, before the interpreter finalises: wait until no collective's worker holds a tensor reduced
    here (see `_reduced`), then destroy the process group."""
    gc.collect()  # frees what only reference cycles hold (else the wait would time out on it)
    deadline = time.monotonic() + timeout
    while any(r() is not None for r in _reduced) and time.monotonic() < deadline:
        time.sleep(0.001)  # lets the worker take the GIL to free it
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- checkpoints -------------------------------------------------------------------------------
STATE_FILE = "training_state.safetensors"


def _state_dict_api():
    """torch.distributed.checkpoint's whole/sharded state-dict helpers, imported on use (about 1 s)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _optimizer_tensors(sd: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer state dict keyed by parameter name as flat tensors `optim.<param>.<key>` + JSON meta."""
    tensors = {
        f"optim.{name}.{k}": v.detach().cpu().contiguous()
        for name, st in sd["state"].items()
        for k, v in st.items()
        if isinstance(v, Tensor)
    }
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_state(tensors: dict[str, Tensor], meta: dict, names: list[str]) -> dict:
    """Back to a state dict keyed by parameter name; `names` (the optimizer's parameters in order) reads
    checkpoints of earlier versions, which keyed the state by position."""
    state: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        param, k = name.removeprefix("optim.").rsplit(".", 1)
        state.setdefault(names[int(param)] if param.isdigit() else param, {})[k] = t
    groups = [
        {**g, "params": [names[p] if isinstance(p, int) else p for p in g["params"]]}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint directory only appears once fully written)."""
    root = out / "checkpoints"
    return (
        sorted(
            (p for p in root.glob("step-*") if (p / STATE_FILE).exists()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        if root.exists()
        else []
    )


def make_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW with decay on matrices only. Fused (one kernel over all parameters): 4x cheaper than
    foreach on CPU for the small preset; FSDP's sharded parameters take the foreach path."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=fused,
        foreach=None if fused else True,
    )


class Trainer:
    """Runs `steps` optimizer steps of `loss_fn(step, micro) -> (loss, metrics)` over `model`.

    Hooks: `after_step(step, metrics)` (e.g. the MoE bias update), `evaluate(step) -> metrics`.
    The run stops (Ctrl-C, time budget) and saves only after a multiple of `every` steps (GRPO's rollout
    batches); `extra_state()` gives tensors a checkpoint must also hold (back in `resumed_extra`).
    """

    def __init__(
        self,
        model: DeepSeekV3,
        cfg: TrainConfig,
        out: str | os.PathLike,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        run_config: dict | None = None,
        every: int = 1,
        extra_state: Callable[[], dict[str, Tensor]] | None = None,
    ):
        cfg.validate()
        if cfg.save_every % every:
            raise ValueError(
                f"save_every: {cfg.save_every} must be a multiple of {every} (steps that belong "
                "together, e.g. the updates on one GRPO rollout batch)"
            )
        self.cfg, self.out = cfg, Path(out)
        self.every, self.extra_state = every, extra_state
        self.resumed_extra: dict[str, Tensor] = {}
        self.dist = setup_distributed(cfg.device)
        # auto: bf16 autocast on a GPU, fp32 on a CPU (where bf16 is often emulated)
        self.precision = (
            cfg.precision
            if cfg.precision != "auto"
            else ("bf16" if self.dist.device.type == "cuda" else "fp32")
        )
        self.model = model.to(self.dist.device)
        if self.precision == "fp8":
            apply_fp8(model)
        self.ep: ExpertParallel | None = None  # before wrapping: DDP must leave the sharded experts alone
        if cfg.expert_parallel > 1:
            check_expert_parallel(cfg.expert_parallel, self.dist.world, model.config, cfg.fsdp)
            self.ep = ExpertParallel(model, cfg.expert_parallel, self.dist.rank, self.dist.world)
        model.prepare("train", compiled=cfg.compile)  # once on its device, with its experts and precision
        self.tokenizer_dir = tokenizer_dir
        self.run_config = run_config or {}
        self.wrapped = self._wrap(model)  # first: FSDP2 swaps the parameters for sharded ones
        if cfg.compile:  # fuses the elementwise work around the matmuls (norms, rope, SwiGLU, router)
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay, fused=not cfg.fsdp)
        self.step = 0
        self._stop = False  # Ctrl-C seen by this process (set by the signal handler only)
        self._interrupted = False  # ... by any rank, as the ranks agreed
        self.metrics_path = self.out / "metrics.jsonl"
        # what the run records of itself: the precision and device it resolved, not "auto"
        self.train_config = {**asdict(cfg), "precision": self.precision, "device": str(self.dist.device)}
        # every record metrics.jsonl gets goes to the trackers too
        self.tracker = Tracker(
            cfg.report_to,
            self.out,
            {"train_config": self.train_config, "run_config": self.run_config},
            enabled=self.dist.main,
        )

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for (
                layer
            ) in model.model.layers:  # MTP modules stay with the root: their head norm runs outside them
                fully_shard(layer)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        # every rank updates the buffers (the gate biases) alike, from all-reduced loads: no sync per forward.
        # Newer torch renamed the flag and warns on the old name (the new one still syncs once, at start).
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        return DistributedDataParallel(
            model, **{"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        )

    # ---- state --------------------------------------------------------------------------------
    def full_model(self) -> DeepSeekV3 | None:
        """The model with whole tensors on the main rank, None elsewhere. Every rank must call it: under
        FSDP the shards are gathered."""
        if self.ep is not None:
            return self.ep.full_model(self.model, self.dist.main)
        if not (self.cfg.fsdp and self.dist.world > 1):
            return self.model if self.dist.main else None
        dcp = _state_dict_api()
        state = dcp.get_model_state_dict(
            self.model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.dist.main:
            return None
        model = DeepSeekV3(self.model.config)
        model.load_state_dict(state)
        return model

    def full_optimizer_state(self) -> dict:
        """The optimizer state keyed by parameter name, whole tensors (gathered like `full_model`)."""
        dcp = _state_dict_api()
        if self.ep is not None:  # each rank's own: every rank takes part in gathering the experts' moments
            return self.ep.full_optimizer_state(dcp.get_optimizer_state_dict(self.model, self.optimizer))
        return dcp.get_optimizer_state_dict(
            self.model, self.optimizer, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N atomically (temp dir + rename); keep the newest `keep_checkpoints`.
        Every rank calls it (FSDP gathers the shards); the main rank writes."""
        model, optim = self.full_model(), self.full_optimizer_state()
        if not self.dist.main:
            return None
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write_model(model, tmp)
            tensors, meta = _optimizer_tensors(optim)
            tensors["rng.torch"] = torch.get_rng_state()
            if self.extra_state is not None:
                tensors.update({f"extra.{k}": v.detach().clone() for k, v in self.extra_state().items()})
            meta.update(step=self.step, train_config=self.train_config, run_config=self.run_config)
            atomic_write(
                tmp / STATE_FILE, lambda p: save_file(tensors, str(p), metadata={"json": json.dumps(meta)})
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                f"could not save checkpoint {final} ({e}); the previous checkpoint is intact"
            ) from None
        for old in checkpoint_dirs(self.out)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_model(self, model: DeepSeekV3, path: Path) -> None:
        save_model(model, path)
        if self.tokenizer_dir:
            copy_tokenizer(self.tokenizer_dir, path)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any; refuses one written for a different run config."""
        found = checkpoint_dirs(self.out)
        if not found:
            return False
        ckpt = found[-1]
        with safe_open(str(ckpt / STATE_FILE), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key, value in self.run_config.items():
            if meta["run_config"].get(key) != value:
                raise ValueError(
                    f"resume: {ckpt} was written with {key}={meta['run_config'].get(key)!r}, "
                    f"this run has {key}={value!r}"
                )
        loaded = load_model(ckpt, device=self.dist.device, dtype=None)
        if loaded.config != self.model.config:
            raise ValueError(f"resume: {ckpt} holds a model with a different config")
        torch.set_rng_state(tensors.pop("rng.torch"))
        self.resumed_extra = {
            k[len("extra.") :]: tensors.pop(k) for k in list(tensors) if k.startswith("extra.")
        }
        dcp = _state_dict_api()
        state = loaded.state_dict()  # whole, whatever expert parallelism wrote it: cut to this rank's experts
        dcp.set_model_state_dict(
            self.model,
            state if self.ep is None else self.ep.local_state(state),
            options=dcp.StateDictOptions(full_state_dict=True),
        )
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        optim = _optimizer_state(tensors, meta, order)
        if self.ep is not None:
            optim = self.ep.local_optimizer_state(optim)
        # not strict: parameters a run never trains (GRPO leaves the MTP layers alone) have no state
        dcp.set_optimizer_state_dict(
            self.model,
            self.optimizer,
            optim,
            options=dcp.StateDictOptions(full_state_dict=True, strict=False),
        )
        self.step = meta["step"]
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        if self.dist.main and self.metrics_path.exists():
            keep = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step
            ]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    # ---- the loop ---------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tracker.log(record)

    def autocast(self):
        if self.precision in ("bf16", "fp8"):
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(
        self,
        loss_fn: Callable[[int, int], tuple[Tensor, dict]],
        after_step: Callable[[int, dict], None] | None = None,
        evaluate: Callable[[int], dict] | None = None,
        eval_every: int = 0,
        tokens_per_step: int = 0,
        progress: bool = True,
    ) -> list[dict]:
        """Run from self.step to cfg.steps; returns the per-step metric records of this call."""
        from tqdm import tqdm

        records: list[dict] = []
        previous = signal.signal(signal.SIGINT, self._on_sigint)  # on every rank: Ctrl-C reaches them all
        # a wall-time budget ends the run before the step count does: no misleading ETA
        bar = tqdm(
            total=None if self.cfg.max_seconds else self.cfg.steps,
            initial=self.step,
            disable=not (progress and self.dist.main),
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        try:
            # asked after the last step too; between the steps of one rollout batch, not at all
            while (
                not (self.step % self.every == 0 and self._agree_to_stop(started))
                and self.step < self.cfg.steps
            ):
                t0 = time.perf_counter()
                lr = lr_at(self.step, self.cfg)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                sums: dict[str, float] = {}
                for micro in range(self.cfg.grad_accum):
                    sync = micro == self.cfg.grad_accum - 1 or self.dist.world == 1
                    ctx = (
                        contextlib.nullcontext()
                        if sync or not hasattr(self.wrapped, "no_sync")
                        else self.wrapped.no_sync()
                    )
                    with ctx:
                        with self.autocast():
                            loss, metrics = loss_fn(self.step, micro)
                        (loss / self.cfg.grad_accum).backward()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / self.cfg.grad_accum
                if self.ep is not None:  # the experts' gradients, which DDP leaves alone
                    self.ep.reduce_grads()
                    grad_norm = self.ep.clip_grad_norm_(list(self.model.parameters()), self.cfg.grad_clip)
                else:
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                record = {"step": self.step + 1, "lr": lr, "grad_norm": grad_norm}
                for k, v in sums.items():  # averaged over ranks
                    record[k] = float(self.dist.all_reduce(torch.tensor(v), "mean"))
                if self.ep is not None:
                    record.update(self.ep.step_metrics())
                if after_step is not None:
                    after_step(self.step, record)
                freeze_after_compiling()  # after a step that compiled (the first ones, with --compile)
                self.step += 1
                dt = time.perf_counter() - t0
                record["step_seconds"] = dt
                if tokens_per_step:
                    record["tokens_per_s"] = tokens_per_step / dt
                if (
                    evaluate is not None
                    and eval_every
                    and (self.step % eval_every == 0 or self.step == self.cfg.steps)
                ):
                    record.update(evaluate(self.step))
                self.log(record)
                records.append(record)
                bar.set_postfix(
                    {
                        k: f"{record[k]:.3g}"
                        for k in ("loss", "tokens_per_s", "val_loss", "reward_mean", "accuracy", "mean_len")
                        if k in record
                    }
                )
                bar.update(1)
                if (
                    self.cfg.save_every
                    and self.step % self.cfg.save_every == 0
                    and self.step < self.cfg.steps
                ):
                    self.save_checkpoint()
            if self._interrupted:
                path = self.save_checkpoint()
                if self.dist.main:
                    print(f"\ninterrupted: saved {path}; continue with --resume")
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
            self.tracker.flush()
            unfreeze_heap()  # the run's objects, cycles included, can be collected once it is dropped
        return records

    def _agree_to_stop(self, started: float) -> bool:
        """Ctrl-C (seen by any rank) or the wall-time budget. Under torchrun the ranks agree, so that all stop
        after the same step and save together."""
        over = bool(self.cfg.max_seconds) and time.perf_counter() - started > self.cfg.max_seconds
        flags = self.dist.all_reduce(torch.tensor([float(self._stop), float(over)]))
        self._interrupted = bool(flags[0] > 0)  # the same on every rank, whenever the signal landed
        return self._interrupted or bool(flags[1] > 0)

    def _on_sigint(self, signum, frame) -> None:
        """Stop after this step and save. A second Ctrl-C gives up at once, except under torchrun, which
        forwards the first one again and kills its workers 30 s later: saving must fit in that."""
        if self._stop and self.dist.world == 1:
            raise KeyboardInterrupt
        self._stop = True

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def finish(self) -> DeepSeekV3 | None:
        """The finished model is the output directory itself (HF format + tokenizer). Every rank calls it;
        the main rank gets the whole model back (for evaluation: under FSDP, `self.model` holds shards)."""
        model = self.full_model()
        if model is not None:
            self._write_model(model, self.out)
            # how the model was made, for its model card (`nanoseek push`)
            meta = {"step": self.step, "train_config": self.train_config, "run_config": self.run_config}
            atomic_write_text(self.out / "train_config.json", json.dumps(meta, indent=2))
        self.tracker.close()
        return model
