"""What each Ray Train worker runs: load (or resume), train with accumulation, validate, report, checkpoint.

- Data: each epoch visits the training episodes in a shuffled order fixed by (seed, epoch); a global
  micro-batch is the next ``batch_size x world`` episodes, split between the ranks
  (``learner/batches.py``).
- Accumulation: an optimizer step takes ``grad_accum`` micro-batches, each loss divided by the group's
  size; the epoch's last step takes the micro-batches that are left, so no gradient ever crosses an
  epoch boundary. DDP all-reduces only on the group's last backward (``no_sync`` on the others).
- Reports (every ``report_every`` steps; each is a Ray Train call, so never per step): the window's
  metrics averaged over the ranks with one small all-reduce; rank 0 appends them to ``metrics.jsonl``.
- Validation every ``val_every`` steps and at the end, on held-out problems: ``*/val_*`` metrics,
  token-weighted over all validation episodes (DPO: pair-weighted over all validation pairs);
  optional early stopping on one of them.
- Checkpoints every ``checkpoint_every`` steps and at the end; resume is exact (``learner/train_state.py``).

``WorkerLoop`` holds it all and also runs in a plain process (world 1, no Ray), which is how the tests
check accumulation, resume and early stopping in seconds; ``train_loop_per_worker`` wires it to Ray Train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from subq.learner.batches import MANIFEST, EpisodeTable, epoch_order, micro_batches
from subq.learner.episodes import collate
from subq.learner.train import TrainConfig, algo_config, uses_bf16
from subq.learner.train_state import (
    adapter_state,
    all_gather,
    all_reduce_sum,
    check_optimizer_fits,
    load_adapter_state,
    no_sync,
    rng_state,
    set_rng_state,
)
from torch import nn

STATE_FILE = "training_state.pt"
Report = Callable[[dict[str, Any], str | None], None]  # (metrics, checkpoint directory or None)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load(cfg: TrainConfig, acfg, device: torch.device, resume_dir: Path | None, state: dict | None):
    """Model, tokenizer and (ILQL) heads: from ``cfg.init``, or from the checkpoint being resumed.

    A LoRA run resumes from its base model (``cfg.init``) plus the adapters saved in its training
    state, so the optimizer's moments meet the adapters they were computed for.
    """
    from safetensors.torch import load_file
    from subq.learner.checkpoint import HEADS_FILE, is_checkpoint, load_checkpoint
    from subq.learner.ilql import ILQLHeads
    from subq.learner.models import load_model_and_tokenizer

    lora = cfg.lora_r > 0
    if resume_dir is not None and lora and (state or {}).get("adapter") is None:
        raise RuntimeError(f"{resume_dir} is a LoRA checkpoint without its adapters (only merged weights, as "
                           "written before adapters were kept): it cannot be resumed exactly; use a new --out")
    source = cfg.init if resume_dir is None or lora else str(resume_dir)
    heads_state = None
    if is_checkpoint(source):
        loaded = load_checkpoint(source, device=str(device))
        model, tokenizer, heads_state = loaded.model, loaded.tokenizer, loaded.heads_state
    else:
        model, tokenizer = load_model_and_tokenizer(source, device=str(device))
    if resume_dir is not None and lora:
        heads_file = resume_dir / HEADS_FILE
        heads_state = load_file(str(heads_file), device=str(device)) if heads_file.is_file() else None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        if resume_dir is not None:
            load_adapter_state(model, state["adapter"])
    model.train()
    heads = None
    if cfg.algo.startswith("ilql"):
        heads = ILQLHeads.for_model(model, two_q=acfg.two_q, hidden_mult=acfg.head_hidden_mult,
                                    q_rank=acfg.q_head_rank).to(device)
        if heads_state is not None:
            heads.load_state_dict(heads_state)
    return model, tokenizer, heads


class WorkerLoop:
    """One worker's training run (see the module docstring); ``run()`` trains until the end."""

    def __init__(self, cfg: TrainConfig, data: EpisodeTable, *, planned_steps: int, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, resume_dir: Path | None = None,
                 prepare: Callable[[nn.Module], nn.Module] = lambda m: m, report: Report | None = None) -> None:
        from subq.learner.bc import BC
        from subq.learner.dpo import DPO
        from subq.learner.ilql import ILQL

        self.cfg, self.data, self.rank, self.world = cfg, data, rank, world
        self.device = device or torch.device("cpu")
        self.report_fn = report or (lambda metrics, checkpoint: None)
        self.acfg = algo_config(cfg, decay_steps=planned_steps)
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=False) if resume_dir else None
        if state is not None and "position" not in state:
            raise RuntimeError(f"{resume_dir} was written by an older subq (no data position): it cannot be "
                               "resumed exactly; use a new --out")
        if state is not None and state["fingerprint"] != data.fingerprint:
            raise RuntimeError(f"{resume_dir} was trained on other data than {data.dir} holds; use a new --out")
        _seed(cfg.seed)  # the same heads on every rank and for every number of workers
        model, self.tokenizer, heads = _load(cfg, self.acfg, self.device, resume_dir, state)
        _seed(cfg.seed + rank)  # dropout and sampling differ between ranks
        self.model, self.heads = model, heads  # unwrapped, for saving
        if heads is not None:
            self.algo = ILQL(prepare(model), prepare(heads), self.acfg)
        else:  # solver-bc's update is BC's; only its episodes differ
            self.algo = (DPO if cfg.algo == "dpo" else BC)(prepare(model), self.acfg)
        self.ddp_modules = [self.algo.model] + ([self.algo.heads] if heads is not None else [])
        self.step, self.epoch, self.position = 0, 0, 0  # position: episodes of this epoch's order trained on
        self.early: dict[str, Any] = {"best": None, "best_step": None, "bad": 0, "stopped": False}
        if state is not None:
            self.algo.optimizer.load_state_dict(state["optimizer"])
            check_optimizer_fits(self.algo.optimizer)
            self.algo.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            self.algo.step, self.early = state["step"], state["early_stopping"]
            if rank < len(state["rng"]):  # a resume on more workers: the new ranks keep their fresh seeds
                set_rng_state(state["rng"][rank])
        self.last_saved = self.step
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if uses_bf16(cfg)
                         else nullcontext())
        self.window: dict[str, list[float]] = {}
        self.tokens, self.t0 = 0, time.perf_counter()
        self.wandb = None

    # ------------------------------------------------------------------------------------ training

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of these units: episodes, or (DPO) [k, 2] pairs with their reference log-probs."""
        if not self.data.pairs:
            return collate(self.data.episodes(rows), self.tokenizer.pad_token_id)
        from subq.learner.dpo import collate_pairs

        ref = self.data.ref_logp
        return collate_pairs(self.data.episodes(rows[:, 0]), self.data.episodes(rows[:, 1]), ref[rows[:, 0]],
                             ref[rows[:, 1]], self.tokenizer.pad_token_id)

    def _log(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.window.setdefault(k, []).append(v)

    def run(self) -> None:
        cfg, n = self.cfg, len(self.data.train_rows)
        done = self.step >= cfg.max_steps or self.early["stopped"]
        while not done and self.epoch < cfg.epochs:
            plan = list(micro_batches(epoch_order(n, cfg.seed, self.epoch), self.position, cfg.batch_size,
                                      self.rank, self.world))
            for g in range(0, len(plan), cfg.grad_accum):
                group = plan[g: g + cfg.grad_accum]
                for i, (idx, consumed) in enumerate(group):
                    batch = self._batch(self.data.train_rows[idx])
                    # gradients stay local until the group's last micro-batch
                    with no_sync(*self.ddp_modules) if i < len(group) - 1 else nullcontext():
                        with self.autocast:
                            loss, metrics = self.algo.loss(batch)
                        (loss / len(group)).backward()
                    self.tokens += int(batch["attention_mask"].sum())
                    self._log(metrics)
                    self.position += consumed
                self._log(self.algo.optimizer_step())
                self.step += 1
                last = self.epoch == cfg.epochs - 1 and g + cfg.grad_accum >= len(plan)
                val = {}
                if len(self.data.val_rows) and ((cfg.val_every and self.step % cfg.val_every == 0)
                                                or last or self.step >= cfg.max_steps):
                    val = self.validate()
                done = self.step >= cfg.max_steps or self.early["stopped"] or last
                if done or val or self.step % cfg.report_every == 0 or self.step % cfg.checkpoint_every == 0:
                    self.report(val, final=done)
                if done:
                    break
            if not done:
                self.epoch, self.position = self.epoch + 1, 0
        if self.last_saved != self.step or self.step == 0:  # e.g. no step left to take: still a final checkpoint
            self.report({}, final=True)
        if self.wandb is not None:
            self.wandb.finish()

    # ---------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """``*/val_*`` metrics over every validation episode (this rank's share, then summed over ranks),
        weighted by action tokens; updates the early-stopping record."""
        rows = np.array_split(self.data.val_rows, self.world)[self.rank]
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}  # per metric: the tokens it was averaged over in this rank's batches
        for i in range(0, len(rows), self.cfg.batch_size):
            with self.autocast:
                metrics = self.algo.evaluate(self._batch(rows[i: i + self.cfg.batch_size]))
            pairs = metrics.pop("charts/val_pairs", None)  # DPO's loss is per pair
            actions = metrics.pop("charts/val_action_tokens") if pairs is None else pairs
            subqs = metrics.pop("charts/val_subq_tokens", 0.0)
            for k, v in metrics.items():
                w = subqs if k.endswith("_subq") else actions  # the sub-question NLL is over their tokens only
                sums[k] = sums.get(k, 0.0) + v * w
                weights[k] = weights.get(k, 0.0) + w
        totals: dict[str, float] = {}
        weight: dict[str, float] = {}
        for part, part_weights in all_gather((sums, weights)):  # a rank without validation rows sends nothing
            for k, v in part.items():
                totals[k] = totals.get(k, 0.0) + v
                weight[k] = weight.get(k, 0.0) + part_weights[k]
        val = {k: v / max(weight[k], 1e-9) for k, v in totals.items()}
        name = self.cfg.early_stopping_metric
        if name not in val:
            raise ValueError(f"early_stopping_metric {name!r} is not a validation metric; these are: {sorted(val)}")
        if self.early["best"] is None or val[name] < self.early["best"]:
            self.early.update(best=val[name], best_step=self.step, bad=0)
        else:
            self.early["bad"] += 1
            if self.cfg.early_stopping_patience and self.early["bad"] >= self.cfg.early_stopping_patience:
                self.early["stopped"] = True
        return val

    # ------------------------------------------------------------------------- reports, checkpoints

    def report(self, val: dict[str, float], *, final: bool) -> None:
        cfg = self.cfg
        keys = sorted(self.window)
        sums = all_reduce_sum([float(np.mean(self.window[k])) for k in keys] + [float(self.tokens)], self.device)
        metrics = {k: v / self.world for k, v in zip(keys, sums, strict=False)}
        metrics.update(val)
        metrics.update({"step": self.step, "epoch": self.epoch,
                        "charts/tokens_per_s": sums[-1] / max(1e-9, time.perf_counter() - self.t0)})
        checkpoint = final or self.step % cfg.checkpoint_every == 0
        rngs = all_gather(rng_state()) if checkpoint else []  # a collective: every rank, same steps
        if self.rank == 0:
            self._write_metrics(metrics)
        # report() uploads the checkpoint before it returns, so the staging copy goes right after it
        with tempfile.TemporaryDirectory(prefix="subq-ckpt-") as tmp:
            path = None
            if checkpoint:
                if self.rank == 0:
                    path = self._save(Path(tmp) / "ckpt", rngs)
                self.last_saved = self.step
            self.report_fn(metrics, path)
        self.window, self.tokens, self.t0 = {}, 0, time.perf_counter()

    def _write_metrics(self, metrics: dict[str, float]) -> None:
        from subq.data_store import uri

        # with a URI ``out``: appended to a local copy (the driver's progress bar follows it on the same
        # node), and the whole file is uploaded after each report (objects cannot be appended to)
        local = uri.stage_dir(self.cfg.out) / "metrics.jsonl"
        remote = uri.join(self.cfg.out, "metrics.jsonl") if uri.is_uri(self.cfg.out) else None
        if remote and not local.exists() and uri.is_file(remote):  # resumed on another node
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(uri.read_bytes(remote))
        local.parent.mkdir(parents=True, exist_ok=True)
        with local.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if remote:
            uri.write_bytes(remote, local.read_bytes())
        if self.cfg.wandb_project and self.wandb is None:
            import wandb
            from subq.learner.checkpoint import strip_secrets

            self.wandb = wandb.init(project=self.cfg.wandb_project, config=strip_secrets(dataclasses.asdict(self.cfg)),
                                    dir=str(local.parent), mode=os.environ.get("WANDB_MODE", "offline"))
        if self.wandb is not None:
            self.wandb.log(metrics, step=self.step)

    def _save(self, path: Path, rngs: list[dict]) -> str:
        from subq.learner.checkpoint import save_checkpoint

        extra = {"algo_config": dataclasses.asdict(self.acfg), "data": self.data.manifest["stats"],
                 "data_fingerprint": self.data.fingerprint, "early_stopping": dict(self.early)}
        if self.heads is not None:
            extra["heads"] = self.heads.heads_config()
        save_checkpoint(path, self.model, self.tokenizer, algo=self.cfg.algo, config=dataclasses.asdict(self.cfg),
                        heads=self.heads, step=self.step, extra=extra)
        torch.save({"step": self.step, "epoch": self.epoch, "position": self.position, "world": self.world,
                    "optimizer": self.algo.optimizer.state_dict(), "scheduler": self.algo.scheduler.state_dict(),
                    "rng": rngs, "fingerprint": self.data.fingerprint, "early_stopping": dict(self.early),
                    "adapter": adapter_state(self.model)}, path / STATE_FILE)
        return str(path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        ray.train.report(metrics, checkpoint=None if checkpoint is None else Checkpoint.from_directory(checkpoint))

    args = {"planned_steps": config["planned_steps"], "rank": rank, "world": world, "device": device,
            "prepare": lambda m: None if m is None else ray.train.torch.prepare_model(m), "report": report}
    from subq.data_store.uri import local_copy

    data = EpisodeTable(local_copy(config["data_dir"], kind="data", complete=MANIFEST))  # a URI: downloaded once
    resume = ray.train.get_checkpoint()
    if resume is None:
        loop = WorkerLoop(cfg, data, **args)
    else:
        with resume.as_directory() as d:  # everything is loaded before the directory may go away
            loop = WorkerLoop(cfg, data, resume_dir=Path(d), **args)
    loop.run()
