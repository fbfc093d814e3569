"""Implicit Language Q-Learning (ILQL; Snell, Kostrikov, Su, Yang & Levine, 2022), one file.

Text is a token-level MDP: the state ``s_t`` is the prefix of tokens up to ``t - 1`` and the action
``a_t`` is token ``t``. A causal LM summarises ``s_t`` in its last hidden state at position ``t - 1``;
small heads on that hidden state give

- ``Q(s_t, ·)``: one value per vocabulary token (two online heads ``q1``, ``q2`` and their Polyak-averaged
  targets ``target_q1``, ``target_q2``, which get no gradient),
- ``V(s_t)``: one scalar (online only).

Losses, averaged over the action tokens of the batch (the batch contract is in ``learner/episodes.py``):

    Bellman (Eq. 2):   L_Q   = sum_i E[(Q_i(s_t, a_t) - y_t)^2],  y_t = r_t + gamma * (1 - done_t) * V(s_{t+1})
                       with V the *online* head, detached (DESIGN §1).
    Expectile (Eq. 3): L_V   = E[|tau - 1(u < 0)| * u^2],  u = min_i Qhat_i(s_t, a_t) - V(s_t)   (Qhat = target)
    CQL:               L_CQL = sum_i E[logsumexp_a Q_i(s_t, a) - Q_i(s_t, a_t)]
    BC ("AWAC" in Snell's code): L_BC = E[-log pi_LM(a_t | s_t)]  on the LM head, so the policy that
                       guidance perturbs stays the behaviour policy of the data.

    total = q_loss_weight * L_Q + v_loss_weight * L_V + cql_alpha * L_CQL + bc_weight * L_BC

Decoding (Eq. 5) perturbs the LM: ``log pi(a|s) + beta * (Q(s, a) - V(s))`` (see ``guided_logits`` and
``learner/guided_decoding.py``).

Two mistakes of paper 1's released code are fixed here and pinned by tests: its Bellman residual was
``q - r + gamma * V'`` (bootstrap sign flipped: it regresses Q onto ``r - gamma * V'``), and its decoder
recomputed the whole prefix at every token (we keep a KV cache).

No Ray here. As in ``bc.py``, the Ray Train driver calls ``ILQL.loss`` per micro-batch, backpropagates
(DDP, gradient accumulation) and then ``ILQL.optimizer_step`` (clip, AdamW, schedule, Polyak update of
the target heads); ``train_step`` is the single-process version of the same.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from subq.learner.bc import subquestion_nll
from subq.learner.optim import OptimConfig, adamw_with_schedule, clip_and_step
from torch import nn


@dataclass
class ILQLConfig(OptimConfig):
    """Hyper-parameters of ILQL; each comment names its source: paper 1 (Tarasov & Shridhar 2024),
    Snell et al. 2022 (ILQL; trlx is its reference port) or "ours" with the reason. The optimizer's
    fields are ``OptimConfig``'s (``learner/optim.py``)."""

    lr: float = 1e-4  # AdamW peak learning rate for the LM and the online heads (Snell et al.: 1e-4)
    gamma: float = 0.99  # per-token discount in y = r + gamma * (1 - done) * V(s') (paper 1 and Snell et al.);
    #                      episodes are finite, so 1.0 is valid too: 0.99 keeps results comparable to paper 1
    tau: float = 0.7  # expectile of V over dataset actions (Snell et al.: 0.7): 0.5 = their mean (SARSA),
    #                  -> 1 = their max (Q-learning)
    cql_alpha: float = 0.1  # weight of the conservative term logsumexp Q(s, .) - Q(s, a) (trlx's `cql_scale`)
    bc_weight: float = 1.0  # weight of the LM head's cross-entropy on action tokens (Snell et al.'s `awac`
    #                        weight, trlx's `awac_scale`)
    q_loss_weight: float = 1.0  # weight of the Bellman MSE, summed over both Q heads (Snell et al.: 1)
    v_loss_weight: float = 1.0  # weight of the expectile loss on V (Snell et al.: 1)
    target_update_rate: float = 0.005  # Polyak alpha per optimizer step, target <- alpha*online + (1-alpha)*target
    #                                   (paper 1 and Snell et al.: 0.005)
    target_warmup: bool = False  # ours, opt-in: Polyak rate max(alpha, 1 / (step + 2)), so for the first
    #                             1/alpha steps the targets are the running mean of the online heads, not
    #                             ~(1 - alpha)^step their near-zero init: for runs much shorter than 1/alpha
    two_q: bool = True  # two Q heads (clipped double Q): min of the targets is V's target and guides decoding
    #                    (Snell et al.'s `double_q`; paper 1)
    head_hidden_mult: int = 1  # heads are Linear(H, m*H)-ReLU-Linear(m*H, out); 0 = a single Linear. Ours:
    #                           Snell et al. use m = 2; the H x vocab output layer dominates, so m = 1 halves the heads
    q_head_rank: int = 0  # > 0: factor each Q head's output layer as (width -> rank -> vocab), for large
    #                      vocabularies (see ILQLHeads); 0: the full width x vocab layer (Snell et al., paper 1)
    beta: float = 1.0  # guidance strength at decoding: log pi + beta * (Q - V); 0 = the plain (BC) LM. Ours:
    #                   Snell et al. tune beta per task at decoding; 1 weighs the advantage like one nat of log-prob
    reward_placement: str = "full"  # episodes' rewards: "full" (usefulness + correct) or "sparse" (correct
    #                                only), paper 1's two placements; ours: "full" uses the usefulness feedback


HEAD_INIT_SCALE = 0.01  # std of an untrained head's output for a unit-scale hidden state (see _head)


def _head(in_dim: int, out_dim: int, hidden_mult: int, rank: int = 0) -> nn.Module:
    """Linear-ReLU-Linear as in Snell's heads (one Linear when ``hidden_mult == 0``), the last layer
    optionally factored through ``rank``.

    The output layer starts near zero (std ``HEAD_INIT_SCALE / sqrt(width)``, bias 0): untrained heads
    say Q ~ V ~ 0, so guided decoding starts as the plain LM. On SmolLM2-135M at 16 GSM8K prompts,
    PyTorch's default init spread Q - V over the vocabulary with a std of 0.47 (this init: 0.008),
    against a median gap of 0.69 between the two likeliest first tokens; the slow target heads carried
    that noise through short runs. Not exactly zero: two identical single-Linear Q heads would get
    identical gradients and never differ (no clipped double Q)."""
    layers: list[nn.Module] = []
    width = in_dim
    if hidden_mult > 0:
        layers += [nn.Linear(in_dim, hidden_mult * in_dim), nn.ReLU()]
        width = hidden_mult * in_dim
    if rank > 0:
        layers.append(nn.Linear(width, rank, bias=False))
        width = rank
    out = nn.Linear(width, out_dim)
    nn.init.normal_(out.weight, std=HEAD_INIT_SCALE / math.sqrt(width))
    nn.init.zeros_(out.bias)
    layers.append(out)
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class HeadsOutput(NamedTuple):
    """What one training forward of ``ILQLHeads`` returns."""

    v: torch.Tensor  # [B, T]: V at every position (the next state of an action can be anywhere)
    q1: torch.Tensor  # [N, vocab]: online Q1 at the N action states
    q2: torch.Tensor | None  # [N, vocab] or None when two_q is False
    target_q: torch.Tensor  # [N, vocab]: min of the target heads, no grad


class ILQLHeads(nn.Module):
    """V and Q heads on an LM's last hidden state (heads only; the LM is not copied).

    The target heads read the same hidden states as the online ones (detached), as in Snell's code:
    target networks for the Q *heads* only, which is what keeps ILQL's memory at about one LM.

    Large vocabularies: the four Q heads (two online, two targets) each end in a width x vocab layer.
    For a 1B student with H = 2048 and a 128k vocabulary that is ~1.07B parameters, ~31 GB with AdamW
    before activations: more than the LM. ``q_rank = r`` factors that layer as width -> r -> vocab
    (a low-rank Q head; r = 256 makes the four heads ~0.15B). Our choice: full heads by default (the
    students we train, SmolLM2-135M and GPT-2 with 49k / 50k vocabularies, afford them, and it is what
    Snell et al. and paper 1 trained), ``q_rank = 256`` for vocabularies of ~100k and more. Whether a
    low-rank head loses quality against the full one is for the quality benchmark to measure (not yet
    run: ``benchmarks/`` has no quality benchmark yet).
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, two_q: bool = True, hidden_mult: int = 1,
                 q_rank: int = 0) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.two_q, self.hidden_mult, self.q_rank = two_q, hidden_mult, q_rank
        self.v_head = _head(hidden_size, 1, hidden_mult)
        self.q1_head = _head(hidden_size, vocab_size, hidden_mult, q_rank)
        self.q2_head = _head(hidden_size, vocab_size, hidden_mult, q_rank) if two_q else None
        # Targets start as exact copies and only move by polyak_update, never by gradient.
        self.target_q1 = copy.deepcopy(self.q1_head).requires_grad_(False)
        self.target_q2 = copy.deepcopy(self.q2_head).requires_grad_(False) if two_q else None

    @classmethod
    def for_model(cls, model: nn.Module, *, two_q: bool = True, hidden_mult: int = 1, q_rank: int = 0) -> ILQLHeads:
        """Heads sized for a Hugging Face causal LM, on its device and in its dtype."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        param = next(getattr(model, "module", model).parameters())
        heads = cls(config.hidden_size, config.vocab_size, two_q=two_q, hidden_mult=hidden_mult, q_rank=q_rank)
        return heads.to(device=param.device, dtype=param.dtype)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ILQLHeads:
        """Heads rebuilt from a saved state dict alone (its shapes give every constructor argument), loaded
        strictly: a missing or extra tensor raises. On the CPU; move them with ``.to(...)``."""
        def weights(prefix: str) -> list[torch.Tensor]:  # the head's Linear weights, input to output
            keys = sorted((k for k in state if k.startswith(prefix) and k.endswith("weight")),
                          key=lambda k: int(k.split(".")[1]) if k.count(".") == 2 else 0)
            return [state[k] for k in keys]

        v, q = weights("v_head."), weights("q1_head.")
        if not v or not q:
            raise ValueError("not an ILQL heads state dict: no v_head / q1_head weights")
        hidden = v[0].shape[1]
        mult = v[0].shape[0] // hidden if len(v) == 2 else 0
        rank = q[-2].shape[0] if len(q) == (3 if mult else 2) else 0
        heads = cls(hidden, q[-1].shape[0], two_q=any(k.startswith("q2_head.") for k in state),
                    hidden_mult=mult, q_rank=rank)
        heads.load_state_dict(state)
        return heads

    def heads_config(self) -> dict[str, int | bool]:
        """Constructor arguments, saved next to the weights so a checkpoint can rebuild the heads."""
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "two_q": self.two_q,
                "hidden_mult": self.hidden_mult, "q_rank": self.q_rank}

    def forward(self, hidden: torch.Tensor, state_hidden: torch.Tensor) -> HeadsOutput:
        """V on all positions of ``hidden`` [B, T, H]; Q on the action states ``state_hidden`` [N, H].

        Q is evaluated only where an action is scored: [N, vocab] instead of [B, T, vocab] per head.
        One forward for everything, so the Ray driver can wrap the heads in DDP.
        """
        v = self.v_head(hidden).squeeze(-1)
        q1 = self.q1_head(state_hidden)
        q2 = self.q2_head(state_hidden) if self.q2_head is not None else None
        return HeadsOutput(v, q1, q2, self.target_q(state_hidden))

    @torch.no_grad()
    def target_q(self, hidden: torch.Tensor) -> torch.Tensor:
        """min(target_q1, target_q2)(hidden): the clipped double-Q estimate (no grad)."""
        hidden = hidden.detach()
        q = self.target_q1(hidden)
        return torch.minimum(q, self.target_q2(hidden)) if self.target_q2 is not None else q

    @torch.no_grad()
    def decode_values(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, V) for guided decoding at hidden states [..., H]: Q = min of the *target* heads (Snell),
        the Polyak-smoothed values that V is regressed against, so Q - V is the advantage V was fit to."""
        return self.target_q(hidden), self.v_head(hidden).squeeze(-1)

    @torch.no_grad()
    def polyak_update(self, rate: float) -> None:
        """target <- rate * online + (1 - rate) * target; rate 1 copies, rate 0 keeps the targets."""
        pairs = [(self.q1_head, self.target_q1)]
        if self.q2_head is not None and self.target_q2 is not None:
            pairs.append((self.q2_head, self.target_q2))
        for online, target in pairs:
            for p, tp in zip(online.parameters(), target.parameters(), strict=True):
                tp.lerp_(p, rate)  # tp + rate * (p - tp); exact copy when rate == 1


def next_state_positions(action_mask: torch.Tensor) -> torch.Tensor:
    """For each position t, the hidden position that summarises the state s_{t+1} after action t.

    That is the position just before the next action token (so V is read where it was trained).
    For contiguous actions it is t itself; observation tokens between actions are skipped. With no
    later action in the row (the last action, or a truncated episode) it is t: the prefix through t.
    """
    T = action_mask.shape[1]
    idx = torch.arange(T, device=action_mask.device).expand_as(action_mask)
    cand = torch.where(action_mask > 0, idx, torch.full_like(idx, T))
    first_at_or_after = cand.flip(1).cummin(1).values.flip(1)
    first_after = torch.cat([first_at_or_after[:, 1:], torch.full_like(idx[:, :1], T)], dim=1)
    return torch.where(first_after < T, first_after - 1, idx)


def bellman_target(rewards: torch.Tensor, dones: torch.Tensor, next_v: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - done) * V(s')  (Eq. 2). Paper 1's code effectively used r - gamma * V'."""
    return rewards + gamma * (1.0 - dones) * next_v


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-element |tau - 1(diff < 0)| * diff^2 with diff = target - V (IQL Eq. 3)."""
    weight = torch.abs(tau - (diff < 0).to(diff.dtype))
    return weight * diff.pow(2)


def guided_logits(lm_logits: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """ILQL's decoding scores (Eq. 5): log_softmax(lm_logits) + beta * (Q - V).

    ``q`` has the shape of ``lm_logits``; ``v`` has it without the vocabulary axis (or with size 1).
    V shifts every token of a state equally, so it cancels in softmax/argmax; it is kept so the scores
    are the paper's (log-policy plus scaled advantage).
    """
    if v.dim() == q.dim() - 1:
        v = v.unsqueeze(-1)
    return F.log_softmax(lm_logits.float(), dim=-1) + beta * (q.float() - v.float())


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (and still in the graph) for a batch without action tokens."""
    return x.sum() / max(x.numel(), 1)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the real module in .module


class ILQL:
    """Trainer: the LM, its ILQL heads, one AdamW over both, a warmup schedule and the target updates.

    Like ``BC``: :meth:`loss` for the Ray driver (which backpropagates, accumulates and then calls
    :meth:`optimizer_step`), :meth:`train_step` for a single process. The model may be a peft model
    (only trainable parameters are optimised); model and heads may be wrapped in DDP by the driver,
    ``loss`` only calls them.
    """

    def __init__(self, model: nn.Module, heads: ILQLHeads, cfg: ILQLConfig) -> None:
        self.model, self.heads, self.cfg = model, heads, cfg
        if _unwrap(heads).two_q != cfg.two_q:  # build them with ILQLHeads.for_model(model, two_q=cfg.two_q, ...)
            raise ValueError(f"heads have two_q={_unwrap(heads).two_q} but the config says {cfg.two_q}")
        params = self.parameters()
        if not params:
            raise ValueError("neither the model nor the heads have trainable parameters")
        self.optimizer, self.scheduler = adamw_with_schedule(params, cfg)
        self.step = 0  # optimizer steps taken

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters: the LM and the online heads (target heads have requires_grad False)."""
        return [p for m in (self.model, self.heads) for p in m.parameters() if p.requires_grad]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The ILQL loss of one (micro-)batch and its metrics; no backward, no optimizer step.

        Batch contract (``learner/episodes.py``): ``input_ids``, ``attention_mask``, ``action_mask``,
        ``rewards``, ``dones``, all [B, T], right-padded.
        """
        self.model.train()
        self.heads.train()
        return self._loss(self._to_device(batch))

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The same metrics on a held-out batch, named ``*/val_*`` (eval mode; train mode is restored)."""
        # The modules without their DDP wrappers: a DDP forward broadcasts buffers, a collective that
        # ranks evaluating different numbers of batches would not match.
        model, heads = _unwrap(self.model), _unwrap(self.heads)
        was_training = model.training
        model.eval()
        try:
            _, metrics = self._loss(self._to_device(batch), model, heads, fidelity=True)
        finally:
            model.train(was_training)
        return {k if "/val_" in k else k.replace("/", "/val_", 1): v for k, v in metrics.items()}

    def _loss(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None,
              heads: nn.Module | None = None, fidelity: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        model = self.model if model is None else model
        heads = self.heads if heads is None else heads
        input_ids = batch["input_ids"]
        out = model(input_ids=input_ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = out.hidden_states[-1]  # [B, T, H]: the LM head's input

        # Action a_t is token t; its state s_t is the prefix up to t - 1, summarised at hidden[:, t - 1].
        # Token 0 has no preceding state and cannot be an action.
        is_action = batch["action_mask"][:, 1:] > 0  # [B, T-1], indexed by t - 1
        actions = input_ids[:, 1:][is_action]  # [N]
        rewards = batch["rewards"][:, 1:][is_action].float()
        dones = batch["dones"][:, 1:][is_action].float()
        heads_out = heads(hidden, hidden[:, :-1][is_action])

        v_all = heads_out.v.float()  # [B, T]
        v_s = v_all[:, :-1][is_action]  # V(s_t)
        next_v = v_all.gather(1, next_state_positions(batch["action_mask"]))[:, 1:][is_action]  # V(s_{t+1})
        q_heads = [heads_out.q1.float()] + ([heads_out.q2.float()] if heads_out.q2 is not None else [])
        q_sa = [q.gather(1, actions[:, None]).squeeze(1) for q in q_heads]  # Q_i(s_t, a_t)
        target_q_sa = heads_out.target_q.float().gather(1, actions[:, None]).squeeze(1)

        # Bellman (Eq. 2): online V(s') detached, zero past the end of an episode.
        y = bellman_target(rewards, dones, next_v.detach(), cfg.gamma)
        q_loss = sum(_mean((q - y).pow(2)) for q in q_sa)
        # Expectile regression of V onto the (detached) clipped double-Q target (Eq. 3).
        v_loss = _mean(expectile_loss(target_q_sa - v_s, cfg.tau))
        # Conservative term: push down Q of all tokens, up on the dataset token (= CE with Q as logits).
        cql_loss = sum(_mean(F.cross_entropy(q, actions, reduction="none")) for q in q_heads)
        # BC on the LM head: logits at t - 1 score token t.
        lm_logits = out.logits[:, :-1][is_action].float()
        bc_loss = _mean(F.cross_entropy(lm_logits, actions, reduction="none"))

        total = (cfg.q_loss_weight * q_loss + cfg.v_loss_weight * v_loss + cfg.cql_alpha * cql_loss
                 + cfg.bc_weight * bc_loss)
        with torch.no_grad():
            q_min = torch.stack(q_sa).min(0).values
            metrics = {
                "losses/q": float(q_loss), "losses/v": float(v_loss), "losses/cql": float(cql_loss),
                "losses/bc": float(bc_loss), "losses/total": float(total),
                "charts/q_mean": float(_mean(q_min)), "charts/v_mean": float(_mean(v_s)),
                "charts/target_q_mean": float(_mean(target_q_sa)),
                "charts/advantage_mean": float(_mean(target_q_sa - v_s)),  # what beta scales at decoding
                "charts/action_tokens": float(actions.numel()),
            }
            if fidelity:  # validation: the policy's fidelity to the held-out sub-questions
                metrics.update(subquestion_nll(out.logits, batch))
        return total, metrics

    def target_rate(self) -> float:
        """This update's Polyak rate: ``target_update_rate``, or with ``target_warmup`` at least
        1 / (step + 2), which keeps the targets at the running mean of the online heads so far (the
        initial copy included) until the constant rate takes over, after ~1 / rate steps."""
        rate = self.cfg.target_update_rate
        return max(rate, 1.0 / (self.step + 2)) if self.cfg.target_warmup else rate

    def update_target_heads(self) -> None:
        """Polyak step of the target Q heads (``optimizer_step`` calls it after every update)."""
        _unwrap(self.heads).polyak_update(self.target_rate())

    def optimizer_step(self) -> dict[str, float]:
        """Clip the accumulated gradients, step optimizer and schedule, zero the gradients, then move
        the target heads towards the online ones."""
        metrics = clip_and_step(self.optimizer, self.scheduler, self.cfg.max_grad_norm)
        metrics["charts/target_rate"] = self.target_rate()
        self.update_target_heads()
        self.step += 1
        return metrics

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One full update on ``batch`` (single process): loss, backward, clip, step, Polyak update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.loss(batch)
        loss.backward()
        return {**metrics, **self.optimizer_step()}
