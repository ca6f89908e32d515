"""The training loop: K peers trained together with the fused loss and MetaMixer.

``python -m metamixer_fast.train [options]`` or ``metamixer-fast train [options]``; under
``torchrun --nproc_per_node=N -m metamixer_fast.train ...`` it runs data-parallel (DDP, gloo on
CPU, nccl on CUDA). One optimizer steps all peers; the loss of a step is
``ce_weight * sum_k CE_k + kd_weight(t) * sum_k KD_k`` on the (mixed) batch.

Each epoch writes ``RUN_DIR/checkpoint.pt`` atomically with the complete state and then appends a
line to ``RUN_DIR/metrics.jsonl``, so ``--resume RUN_DIR`` continues bit for bit (on CPU), and a
run stopped between the two still resumes (its metrics are rewritten from the checkpoint).
Ctrl-C ends a run with status 130 and one line naming that command (no traceback). A run creates
its directory before it reads the data (one that cannot be created is an error then) and locks it
for its whole life: a second run into it, fresh or ``--resume``, is refused at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint, memory, process_group, run_directory
from .config import ConfigError, TrainConfig, add_arguments, from_args, from_mapping, load_toml
from .data import DatasetError
from .loss import MixedKDLoss

# Options that may differ between a checkpoint and the --resume invocation: they do not change
# what is computed. Everything else must match, or the resumed run would not be the same run.
# 'data_dir' says where the data is, not what it is (a moved data set is found again; the
# checkpoint's fingerprint of the training labels refuses other data). 'out' is not here: a
# resumed run always writes into the directory it was resumed from.
RESUME_MUTABLE = ("progress", "stop_after_epochs", "eval_batch_size", "retain_memory", "data_dir")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stops instead of corrupting the weights."""


# ------------------------------------------------------------------------------------ set-up

def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("config 'device' is cuda but no CUDA device is available; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class PeerGroup(nn.Module):
    """The K peers as one module (one DDP wrapper, one optimizer); forward returns K logits."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [peer(x) for peer in self.peers]


def build_criterion(cfg: TrainConfig) -> MixedKDLoss:
    mode = "ensemble" if cfg.method == "kdcl" else "pairwise"
    kd_weight = 0.0 if cfg.method == "independent" else cfg.kd_weight
    return MixedKDLoss(temperature=cfg.temperature, kd_weight=kd_weight, mode=mode,
                       label_smoothing=cfg.label_smoothing)


def build_mixer(cfg: TrainConfig, generator: torch.Generator) -> Any | None:
    """The batch sampler of the method, or None for unmixed methods."""
    from . import metamixer

    if cfg.method == "metamixer":
        return metamixer.MetaMixer(local_alpha=cfg.local_alpha, global_alpha=cfg.global_alpha,
                                   prob=cfg.mix_prob, stages=tuple(cfg.stages),
                                   local_pairing=cfg.local_pairing,
                                   global_pairing=cfg.global_pairing, generator=generator)
    if cfg.method == "cutmix":
        return metamixer.CutMix(cfg.cutmix_alpha, prob=cfg.mix_prob, generator=generator)
    if cfg.method == "mixup":
        return metamixer.Mixup(cfg.mixup_alpha, prob=cfg.mix_prob, generator=generator)
    return None


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine to 0 or multistep decay; a function of the global step."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        # capped: a warm-up shorter than one step would otherwise start above the peak lr
        return min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1.0, total - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.gamma ** sum(progress >= m for m in cfg.milestones)


def kd_ramp(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    if cfg.kd_ramp_epochs <= 0:
        return 1.0
    return min(1.0, (step + 1) / (cfg.kd_ramp_epochs * steps_per_epoch))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_fingerprint(labels: Tensor) -> str:
    """sha256 of the training labels in file order: cheap, and tells data sets apart, so a run
    resumed with another --data-dir is checked to see the data it was trained on."""
    return hashlib.sha256(labels.cpu().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def config_errors(what: str) -> Iterator[None]:
    """A ValueError while building a part of the run from the config is a bad option: it becomes
    a ConfigError (the CLI's `error: ...`, status 2) instead of a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"config {what}: {exc}") from None


def check_stages(peers: list[nn.Module], cfg: TrainConfig) -> None:
    """Every MetaMixer stage must be a submodule of every peer, found before the first step that
    draws it (config validation knows the built-in models' stages only, not a factory's)."""
    from .plan import INPUT_STAGE

    for k, peer in enumerate(peers):
        names = dict(peer.named_modules(remove_duplicate=False))
        missing = [s for s in cfg.stages if s != INPUT_STAGE and s not in names]
        if missing:
            known = getattr(peer, "stage_names", None)
            hint = (f"its stages are {', '.join((INPUT_STAGE, *known))}" if known
                    else f"use '{INPUT_STAGE}' or names of the peer's submodules")
            raise ConfigError(f"config 'stages': peer {k} ({cfg.peer_archs[k]}) has no submodule "
                              f"{', '.join(map(repr, missing))}; {hint}")


# ------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(group: PeerGroup, batches: Iterator[tuple[Tensor, Tensor]],
             autocast: contextlib.AbstractContextManager) -> dict[str, Any]:
    """Top-1 of each peer and of the ensemble (mean of the peers' softmax)."""
    group.eval()
    correct: Tensor | None = None
    total = 0
    for x, y in batches:
        with autocast:
            logits = torch.stack([z.float() for z in group(x)])  # [K, B, C]
        hits = torch.cat([logits.argmax(-1) == y, (logits.softmax(-1).mean(0).argmax(-1) == y)[None]])
        batch_correct = hits.sum(1)
        correct = batch_correct if correct is None else correct + batch_correct
        total += y.numel()
    group.train()
    assert correct is not None, "the evaluation set is empty"
    acc = (correct.double() / total * 100).tolist()
    return {"top1": [round(a, 3) for a in acc[:-1]], "ensemble_top1": round(acc[-1], 3)}


# ------------------------------------------------------------------------------ the loop

class Run:
    """Everything one training run holds; ``state_dict`` is the checkpoint."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
        if cfg.retain_memory and self.device.type == "cpu":
            memory.retain_freed_memory()
        self.rank, self.world = process_group.init(self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        train_set = self.load_data()
        peers = self.build_peers(train_set.num_classes, train_set.images.shape[1])
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        # (Module.to takes memory_format, which torch's type stubs leave out)
        self.group = PeerGroup(peers).to(self.device, memory_format=memory_format)  # type: ignore[call-overload]
        self.model: nn.Module = self.group
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.group, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

        self.optimizer = torch.optim.SGD(self.group.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0,
                                         weight_decay=cfg.weight_decay, foreach=True)
        self.steps_per_epoch = self.epoch_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg, step, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        with config_errors("(loss options)"):
            self.criterion = build_criterion(cfg)
        self.base_kd_weight = self.criterion.kd_weight
        # Each rank draws its own mixing plans (its own generator); the checkpoint keeps them all.
        with config_errors("(mixing options)"):
            self.mixer = build_mixer(cfg, torch.Generator().manual_seed(cfg.seed * 7919 + self.rank + 1))
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []

    def load_data(self) -> Any:
        """Sets up both loaders; returns the training set."""
        from . import data

        cfg = self.cfg
        synthetic = ({"num_train": cfg.synthetic_size, "num_test": max(64, cfg.synthetic_size // 4),
                      "seed": cfg.seed} if cfg.dataset == "synthetic" else {})
        train_set, test_set = data.load_dataset(cfg.dataset, cfg.data_dir or None, **synthetic)
        per_rank = len(train_set) // self.world
        if per_rank < cfg.batch_size:  # an epoch drops its last partial batch: none would be left
            raise ConfigError(f"config 'batch_size' {cfg.batch_size} is more than the {per_rank} training "
                              f"images{' per process' if self.world > 1 else ''}, so there is no full "
                              f"batch; lower it" + (" or raise 'synthetic_size'" if synthetic else ""))
        with config_errors("'batch_size' / 'eval_batch_size'"):
            self.train_batches = data.BatchLoader(
                train_set, cfg.batch_size, shuffle=True, augment=True, drop_last=True, seed=cfg.seed,
                device=self.device, channels_last=cfg.channels_last, rank=self.rank, world_size=self.world)
            self.test_batches = data.BatchLoader(
                test_set, cfg.eval_batch_size, shuffle=False, augment=False, device=self.device,
                channels_last=cfg.channels_last)
        self.data_fingerprint = data_fingerprint(train_set.labels)
        return train_set

    def build_peers(self, num_classes: int, in_channels: int) -> list[nn.Module]:
        from . import models

        try:
            peers = [models.build_model(a, num_classes, in_channels) for a in self.cfg.peer_archs]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"config 'arch': {exc}") from None
        if self.cfg.method == "metamixer":
            check_stages(peers, self.cfg)
        return peers

    def epoch_steps(self) -> int:
        steps = len(self.train_batches)
        if self.cfg.limit_train_batches:
            steps = min(steps, self.cfg.limit_train_batches)
        if steps < 1:
            raise ConfigError(f"config 'batch_size' {self.cfg.batch_size} leaves no full batch in "
                              f"the training set; lower it")
        return steps

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint. Under DDP every rank must call it: the RNGs and the mixer draw
        differently on each rank, so their states are gathered into lists indexed by rank."""
        mixer = self.gather(self.mixer.state_dict()) if self.mixer is not None else None
        return {"config": self.cfg.to_dict(), "epoch": self.epoch, "step": self.step,
                "peers": [p.state_dict() for p in self.group.peers],
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": self.gather(rng_state()), "mixer": mixer,
                "train_batches": self.train_batches.state_dict(), "history": self.history,
                "data": {"train_labels_sha256": self.data_fingerprint}}

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (collective under DDP)."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def own_entry(self, value: Any, what: str) -> Any:
        """This rank's entry of a per-rank list of the checkpoint. Older checkpoints hold one
        state (rank 0's): it is this run's where there is one rank. For the RNGs it is also what
        every rank loaded before (the ranks' CPU generators advance alike); for the mixer it is
        not, so such a checkpoint is refused under DDP."""
        if isinstance(value, list):
            if len(value) != self.world:
                raise checkpoint.CheckpointError(
                    f"the checkpoint holds the {what} state of {len(value)} processes but this run "
                    f"has {self.world}; resume with as many processes as the run was started with")
            return value[self.rank]
        if self.world > 1 and what == "mixer":
            raise checkpoint.CheckpointError(
                "the checkpoint holds the mixer state of rank 0 only (written by an older version), "
                "so the other ranks cannot continue their own mixing; start the run afresh")
        return value

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_data(state)
        try:
            for peer, sd in zip(self.group.peers, state["peers"], strict=True):
                peer.load_state_dict(sd)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.mixer is not None:
                self.mixer.load_state_dict(self.own_entry(state["mixer"], "mixer"))
            self.train_batches.load_state_dict(state["train_batches"])
            set_rng_state(self.own_entry(state["rng"], "rng"))
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.history = list(state["history"])
        except checkpoint.CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise checkpoint.CheckpointError(f"the checkpoint does not fit this run's models or "
                                             f"optimizer: {exc}") from None

    def check_data(self, state: dict[str, Any]) -> None:
        """The data must be the data the run was trained on ('data_dir' may change on resume)."""
        data = state.get("data")  # absent in older checkpoints
        saved = data.get("train_labels_sha256") if isinstance(data, dict) else None
        if saved is not None and saved != self.data_fingerprint:
            where = self.cfg.data_dir or "the default data directory"
            raise checkpoint.DataMismatchError(
                f"the training data in {where} is not the data this run was trained on (its labels "
                f"differ)", f"resume with --data-dir pointing at the original {self.cfg.dataset} files")

    # -- training --------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, k = self.cfg, len(self.group.peers)
        sums = torch.zeros(2 * k + 2, device=self.device, dtype=torch.float64)
        first_bad = torch.full((2,), -1, dtype=torch.int64, device=self.device)  # step, peer
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.rank == 0), file=sys.stderr, leave=False)
        log_every = max(1, min(50, self.steps_per_epoch // 10))
        start, images = time.perf_counter(), 0
        for i, (x, y) in enumerate(itertools.islice(self.train_batches, self.steps_per_epoch)):
            out, correct = self.train_step(x, y)
            # A peer whose own CE is non-finite is the culprit; a non-finite KD alone may come
            # from another peer's logits (its targets).
            bad_peer = (2 * (~torch.isfinite(out.ce)).to(torch.int64)
                        + (~torch.isfinite(out.kd)).to(torch.int64)).argmax()
            is_bad = ~torch.isfinite(out.loss) & (first_bad[0] < 0)
            first_bad = torch.where(is_bad, torch.stack([torch.tensor(self.step, device=self.device),
                                                         bad_peer]), first_bad)
            sums += torch.cat([out.loss.detach()[None], out.ce.detach(), out.kd.detach(),
                               correct[None]]).double()
            self.step += 1
            images += y.numel()
            if (i + 1) % log_every == 0 or i + 1 == self.steps_per_epoch:
                self.check_finite(first_bad, out)
                bar.update(i + 1 - bar.n)
                rate = images * self.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{sums[0].item() / (i + 1):.3f}",
                                train_top1=f"{100 * sums[-1].item() / images / k:.1f}",
                                img_s=f"{rate:.0f}")
        bar.close()
        if self.train_batches.position:  # a limited epoch: the next one starts a fresh order
            self.train_batches.end_epoch()
        seconds = time.perf_counter() - start
        n = self.steps_per_epoch
        process_group.mean_over_ranks(sums, self.world)  # under DDP: every rank's shard, not rank 0's
        return {"train_loss": round(sums[0].item() / n, 5),
                "train_ce": [round(v / n, 5) for v in sums[1:k + 1].tolist()],
                "train_kd": [round(v / n, 5) for v in sums[k + 1:2 * k + 1].tolist()],
                "train_top1_primary": round(100 * sums[-1].item() / images / k, 3),
                "images_per_s": round(images * self.world / seconds, 1), "epoch_seconds": round(seconds, 2)}

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Any, Tensor]:
        cfg = self.cfg
        self.criterion.kd_weight = self.base_kd_weight * kd_ramp(cfg, self.step, self.steps_per_epoch)
        target: Any = y
        mixing: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.mixer is not None:
            plan = self.mixer.sample(y)
            x = plan.apply(x)  # local mixing, and the global blend too at the "input" stage
            target = plan.target
            mixing = plan.global_mixing(list(self.group.peers))
        with mixing, self.autocast():
            logits = self.forward(x)
        out = self.criterion(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16: a step the GradScaler skipped (inf gradients) still advances the schedule,
            # which keeps it aligned with the step count; torch warns about exactly that.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.scheduler.step()
        primary = target.labels[:, 0] if hasattr(target, "labels") else target
        correct = sum((z.detach().argmax(-1) == primary).sum() for z in logits)
        return out, correct

    def check_finite(self, first_bad: Tensor, out: Any) -> None:
        step, peer = first_bad.tolist()
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {self.epoch + 1}), first in peer {peer} "
                f"(ce {out.ce.tolist()}, kd {out.kd.tolist()} at step {self.step - 1}); lower the "
                f"learning rate, use --amp bf16 or none, or check the data; {self._saved_note()}")

    def _saved_note(self) -> str:
        if self.epoch == 0:
            return f"no checkpoint was written yet (it is written after each epoch in {self.cfg.out})"
        return f"the last checkpoint in {self.cfg.out} (epoch {self.epoch}) is intact"

    def evaluate(self) -> dict[str, Any]:
        """Top-1 on the test set, or on its first ``limit_eval_batches`` batches (only those are
        made; the next evaluation starts again at the first batch)."""
        try:
            batches = itertools.islice(self.test_batches, self.cfg.limit_eval_batches or None)
            return evaluate(self.group, batches, self.autocast())
        finally:
            self.test_batches.end_epoch()

    def sync_report(self) -> dict[str, Any]:
        """Under DDP: whether every rank holds the same parameters (they must)."""
        if self.world == 1:
            return {}
        flat = torch.cat([p.detach().double().flatten() for p in self.group.parameters()])
        checksum = torch.stack([flat.sum(), (flat * flat).sum()]).to(self.device)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        sums = [g.tolist() for g in gathered]
        return {"world_size": self.world, "param_checksums": sums,
                "ranks_in_sync": all(s == sums[0] for s in sums)}


# ------------------------------------------------------------------------------ driver

def fit(cfg: TrainConfig, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or continue) a run; returns the last epoch's metrics."""
    run_dir = Path(cfg.out)
    writer = run_directory.is_writer()
    if resume is None and not (writer and run_dir.is_dir()):
        # before the data and the models are built; every rank checks before any rank can write
        # (rank 0 writes only after the process group, started by Run, has gathered them all).
        # The writer checks an existing directory under its lock instead (below): a directory
        # that another run is writing is then refused as in use, not as holding that run's files.
        run_directory.check_fresh(run_dir)
    with writer_lock(run_dir, fresh=resume is None):
        if resume is None and writer:
            run_directory.check_fresh(run_dir)
        return _fit(cfg, run_dir, resume)


def writer_lock(run_dir: Path, fresh: bool) -> contextlib.AbstractContextManager:
    """The run directory's lock for the run's whole life, taken by the process that writes it
    (rank 0 under torchrun; see ``run_directory.hold``): a second run into the same directory, fresh
    or resumed, is refused at once instead of interleaving its files with this one's. A fresh
    run's directory is created here, so that one that cannot be is an error before the data is
    read."""
    if not run_directory.is_writer():
        return contextlib.nullcontext()
    fix = ("wait for it to end, or choose another --out" if fresh
           else "wait for it to end before resuming the run")
    return run_directory.hold(run_dir, create_it=fresh, fix=fix)


def _fit(cfg: TrainConfig, run_dir: Path, resume: dict[str, Any] | None) -> dict[str, Any]:
    run = Run(cfg)
    if resume is not None:
        run.load_state_dict(resume)
        if run.rank == 0:
            run_directory.rewrite_metrics(run_dir, run.history)
            run_directory.write_config(run_dir, cfg.to_dict())  # its 'out' is where it is now
    elif run.rank == 0:
        run_directory.prepare(run_dir, cfg.to_dict())
    if run.epoch >= cfg.epochs:
        print(f"run {run_dir} already finished {run.epoch} epochs", file=sys.stderr)
        return run.history[-1] if run.history else {}
    done_here = 0
    while run.epoch < cfg.epochs:
        record = {"epoch": run.epoch + 1, "step": run.step + run.steps_per_epoch,
                  "lr": run.optimizer.param_groups[0]["lr"], **run.train_epoch()}
        run.epoch += 1
        record.update(run.evaluate())
        record.update(run.sync_report())
        run.history.append(record)
        state = run.state_dict()  # on every rank: it gathers the ranks' mixer and RNG states
        if run.rank == 0:
            # checkpoint first: a run stopped between the two writes then has a checkpoint to
            # resume from, while a metrics line without one would leave a first epoch's
            # directory neither resumable nor fresh
            checkpoint.save(state, run_dir)
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"epoch {record['epoch']}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                  f"top-1 per peer {record['top1']}  ensemble {record['ensemble_top1']}  "
                  f"{record['images_per_s']:.0f} img/s", flush=True)
        done_here += 1
        if cfg.stop_after_epochs and done_here >= cfg.stop_after_epochs and run.epoch < cfg.epochs:
            print(f"stopped after {done_here} epoch(s) as asked; continue with --resume {run_dir}",
                  file=sys.stderr)
            break
    if run.world > 1:
        dist.barrier()
    return run.history[-1]


def resume_config(state: dict[str, Any], overrides: dict[str, Any], run_dir: str | Path | None = None,
                  saved_in: str = "the checkpoint", wanted_by: str = "--resume") -> TrainConfig:
    """The checkpoint's config; an override may only change what does not alter the results.

    ``run_dir``: where the checkpoint was read. The resumed run writes there (the directory may
    have moved since), never elsewhere: an 'out' override must name the same directory.
    ``saved_in``: where ``state['config']`` was read, and ``wanted_by`` who asks for the
    overrides, for the message (a study also checks a run's config.json this way)."""
    overrides = {key.replace("-", "_"): value for key, value in overrides.items()}
    saved = from_mapping({**state["config"], "stop_after_epochs": 0})  # a new invocation
    if run_dir is not None:
        saved.out = str(run_dir)
    out = overrides.pop("out", None)
    if out is not None and Path(str(out)).resolve() != Path(saved.out).resolve():
        raise ConfigError(f"--out {out} differs from the run directory {saved.out} being resumed; a "
                          f"resumed run writes only into its own directory: drop --out (or pass "
                          f"--resume {out} to continue the run there)")
    for name, value in overrides.items():
        if name in RESUME_MUTABLE:
            continue
        given = getattr(from_mapping({name: value}), name)
        if given != getattr(saved, name):
            raise checkpoint.CheckpointError(
                f"option '{name}' is {getattr(saved, name)!r} in {saved_in} but {wanted_by} asks "
                f"for {given!r}",
                f"a resumed run must keep its configuration (only {', '.join(RESUME_MUTABLE)} "
                f"may change)")
    return from_mapping({k: v for k, v in overrides.items() if k in RESUME_MUTABLE}, saved).validate()


def resume_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a --resume invocation: its config file's, overridden by its flags. The
    file's 'out' is left out: it is where fresh runs of that file go, not a request to move this
    one (an explicit --out is checked by ``resume_config``)."""
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume")}
    if args.config:
        from_file = {k: v for k, v in load_toml(args.config).items() if k != "out"}
        overrides = {**from_file, **overrides}
    return overrides


def build_parser(prog: str = "metamixer-fast train") -> argparse.ArgumentParser:
    # allow_abbrev=False: '--epoch 1' would otherwise be taken for '--epochs 1' without a word,
    # and a new option could silently change what an abbreviation means
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Train K peer networks together with online knowledge distillation and "
                    "MetaMixer (or a baseline method).")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "metamixer-fast train") -> int:
    args = build_parser(prog).parse_args(argv)
    run_dir: str | None = args.resume  # where the run writes, once known (for Ctrl-C's note)
    # a process group that fit() starts (under torchrun) is ended here, not left to the
    # interpreter's exit (the command's entry points then leave through exit_process)
    try:
        with process_group.ended_after():
            if args.resume:
                # locked before the checkpoint is read: a run still writing it would otherwise
                # be resumed from a checkpoint it replaces a moment later
                with writer_lock(Path(args.resume), fresh=False):
                    state = checkpoint.load(args.resume)
                    cfg = resume_config(state, resume_overrides(args), run_dir=args.resume)
                    final = fit(cfg, resume=state)
            else:
                cfg = from_args(args)
                run_dir = cfg.out
                final = fit(cfg)
    except (ConfigError, checkpoint.CheckpointError, NonFiniteLossError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: the checkpoint of the last finished epoch is intact (written atomically), so a
        # traceback would only hide what to do next. Under torchrun every process gets it and
        # returns; rank 0 says so, and the status (128 + SIGINT) tells torchrun the run stopped.
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_note(prog, run_dir), file=sys.stderr, flush=True)
        return 130
    if final and os.environ.get("RANK", "0") == "0":  # one line per run under torchrun
        print(f"{result_label(final, cfg.epochs)}: top-1 per peer {final['top1']}  "
              f"ensemble {final['ensemble_top1']}")
    return 0


def result_label(last: dict[str, Any], epochs: int) -> str:
    """'final' for a run that trained every epoch; 'after epoch E/N' for one that stopped
    early (--stop-after-epochs): its accuracy is not the run's result, and a script that takes
    the 'final:' line as one must not find it."""
    done = last.get("epoch", epochs)
    return "final" if done >= epochs else f"after epoch {done}/{epochs}"


def interrupted_note(prog: str, run_dir: str | None) -> str:
    """The one line that ends an interrupted run: what is saved, and how to go on."""
    if run_dir is None:
        return "interrupted before training started; nothing was written"
    if not (Path(run_dir) / checkpoint.NAME).is_file():
        return (f"interrupted before the first epoch ended, so {run_dir} holds no checkpoint; run "
                f"the same command again to start afresh")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    processes = " (under torchrun, with as many processes)" if torchrun else ""
    return (f"interrupted; the last checkpoint in {run_dir} (written after every epoch) is intact: "
            f"continue with {prog} --resume {run_dir}{processes}")


if __name__ == "__main__":
    process_group.exit_process(main(prog="python -m metamixer_fast.train"))
