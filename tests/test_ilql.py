"""ILQL correctness: analytic Q/V on a tiny text MDP, the Bellman sign, expectiles, Polyak, a smoke step.

The MDP tests use ``PrefixModel``, a stub with the HF causal-LM interface whose hidden state at position
t is a one-hot code of the whole prefix tokens[0..t]. With linear heads (``hidden_mult=0``) the Q and V
heads are then exact lookup tables over states, so ILQL's fixed point can be checked against values
computed by hand, and any error in positions, signs or terminal handling shows up as a wrong number.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import subq.learner.ilql as ilql_mod
import torch
from subq.learner.ilql import ILQL, ILQLConfig, ILQLHeads, expectile_loss, guided_logits, next_state_positions
from torch import nn

CTX, PAD = 0, 4  # token 0 is the context (prompt) token; actions are tokens 1, 2, 3
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster
ACTIONS = (1, 2, 3)
VOCAB = 5
GAMMA = 0.9


class PrefixModel(nn.Module):
    """HF-like causal LM stub: hidden[t] = one-hot(code of tokens[0..t]), logits = a Linear on it.

    code_t = code_{t-1} * (V + 1) + token_t + 1 is a distinct integer for every prefix (base V + 1 digits).
    """

    def __init__(self, vocab: int = VOCAB, max_len: int = 4) -> None:
        super().__init__()
        self.n_codes = (vocab + 1) ** max_len
        self.base = vocab + 1
        self.lm_head = nn.Linear(self.n_codes, vocab)

    def codes(self, input_ids: torch.Tensor) -> torch.Tensor:
        code = torch.zeros_like(input_ids[:, 0])
        out = []
        for t in range(input_ids.shape[1]):
            code = code * self.base + input_ids[:, t] + 1
            out.append(code)
        return torch.stack(out, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        hidden = nn.functional.one_hot(self.codes(input_ids), self.n_codes).float()
        return SimpleNamespace(logits=self.lm_head(hidden), hidden_states=(hidden,))

    def hidden_of(self, prefix: tuple[int, ...]) -> torch.Tensor:
        """The hidden state that summarises the state 'prefix' (its last position)."""
        return self.forward(torch.tensor([prefix])).hidden_states[-1][0, -1]


# ----------------------------------------------------------------------------- the MDP, by hand
# Episode: CTX, a1, a2, a3. Rewards (deterministic):
#   step 1: 0.5 for a1 = 2 (a greedy trap), else 0;  step 2: 0;
#   step 3: copying a2 pays w(a2) * m(a1), w = {1: 1, 2: 0.5, 3: 0}, m = 2 if a1 == 1 else 1.
# Optimal values (gamma = 0.9), by hand:
#   V*(a1, a2) = w(a2) m(a1);  Q*((a1), a2) = 0.9 w(a2) m(a1);  V*((a1)) = 0.9 m(a1)
#   Q*((), a1) = r1(a1) + 0.81 m(a1) = 1.62, 1.31, 0.81 for a1 = 1, 2, 3;  V*(()) = 1.62.
W = {1: 1.0, 2: 0.5, 3: 0.0}


def reward(prefix: tuple[int, ...], a: int) -> float:
    if len(prefix) == 0:
        return 0.5 if a == 2 else 0.0
    if len(prefix) == 1:
        return 0.0
    a1, a2 = prefix
    return W[a2] * (2.0 if a1 == 1 else 1.0) if a == a2 else 0.0


HORIZON = 3


def expectile(values: list[float], tau: float) -> float:
    """The tau-expectile of equally weighted values: the root of sum |tau - 1(x < v)| (x - v) = 0."""
    lo, hi = min(values), max(values)
    for _ in range(100):  # bisection; the left side is decreasing in v
        mid = (lo + hi) / 2
        if sum((tau if x > mid else 1 - tau) * (x - mid) for x in values) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def optimal_q(prefix: tuple[int, ...], a: int, tau: float = 1.0) -> float:
    """Q(prefix, a) by backward recursion with V(s) = tau-expectile of Q(s, .) over the dataset actions.

    tau = 1 is the max, i.e. the optimal Q*; tau < 1 is ILQL's exact fixed point on this data (every
    action appears equally often in every state)."""
    nxt = prefix + (a,)
    if len(nxt) == HORIZON:
        return reward(prefix, a)
    return reward(prefix, a) + GAMMA * expectile([optimal_q(nxt, b, tau) for b in ACTIONS], tau)


def episodes_batch(horizon: int = HORIZON, reward_fn=reward) -> dict[str, torch.Tensor]:
    """All len(ACTIONS)**horizon action sequences once: every (state, action) pair is in the data."""
    rows = list(itertools.product(ACTIONS, repeat=horizon))
    T = horizon + 1
    ids = torch.tensor([(CTX, *r) for r in rows])
    rewards = torch.tensor([[0.0] + [reward_fn(r[:k], r[k]) for k in range(horizon)] for r in rows])
    action_mask = torch.zeros(len(rows), T)
    action_mask[:, 1:] = 1.0
    dones = torch.zeros(len(rows), T)
    dones[:, -1] = 1.0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "action_mask": action_mask,
            "rewards": rewards, "dones": dones}


def train_tabular(batch: dict[str, torch.Tensor], *, tau: float, steps: int, gamma: float = GAMMA,
                  max_len: int = HORIZON + 1) -> tuple[PrefixModel, ILQLHeads]:
    torch.manual_seed(0)
    model = PrefixModel(max_len=max_len)
    heads = ILQLHeads(model.n_codes, VOCAB, two_q=True, hidden_mult=0)
    # Adam on lookup tables: lr 0.02 moves a value ~2 in 100 steps; a larger lr or Polyak rate oscillates.
    # The lr decays to 0 over the run: at a constant lr Adam never settles on the fixed point (its step is
    # ~lr whatever the gradient), so the end state was a snapshot of an oscillation of up to ~0.08 whose
    # phase at step 300 moved with the seed or the first Polyak rates.
    cfg = ILQLConfig(gamma=gamma, tau=tau, cql_alpha=0.0, bc_weight=0.0, target_update_rate=0.2, lr=0.02,
                     max_grad_norm=0.0, lr_decay="cosine", decay_steps=steps)
    algo = ILQL(model, heads, cfg)
    for _ in range(steps):
        algo.train_step(batch)
    return model, heads


def learned(model: PrefixModel, heads: ILQLHeads, prefix: tuple[int, ...]) -> tuple[list[float], float]:
    """(online Q1(prefix, a) for a in ACTIONS, V(prefix)) read from the heads at the prefix's hidden."""
    h = model.hidden_of((CTX, *prefix))
    with torch.no_grad():
        q = heads.q1_head(h)
        v = heads.v_head(h).item()
    return [q[a].item() for a in ACTIONS], v


def max_errors(model: PrefixModel, heads: ILQLHeads, tau: float = 1.0) -> tuple[float, float]:
    """Largest |Q - Q_ref| and |V - V_ref| over every non-terminal state (tau = 1: the optimal values)."""
    q_err = v_err = 0.0
    for k in range(HORIZON):
        for prefix in itertools.product(ACTIONS, repeat=k):
            q, v = learned(model, heads, prefix)
            q_ref = [optimal_q(prefix, a, tau) for a in ACTIONS]
            q_err = max(q_err, max(abs(x - y) for x, y in zip(q, q_ref, strict=True)))
            v_err = max(v_err, abs(v - expectile(q_ref, tau)))
    return q_err, v_err


def test_hand_computed_values_match_recursion() -> None:
    assert [round(optimal_q((), a), 6) for a in ACTIONS] == [1.62, 1.31, 0.81]
    assert round(optimal_q((1,), 1), 6) == 1.8 and round(optimal_q((2,), 2), 6) == 0.45
    assert optimal_q((1, 1), 1) == 2.0 and optimal_q((1, 1), 2) == 0.0


@pytest.fixture(scope="module")
def flipped_errors() -> tuple[float, float]:
    """The same training with paper 1's bootstrap sign (Q regressed onto r - gamma * V')."""
    flipped = lambda rewards, dones, next_v, gamma: rewards - gamma * (1.0 - dones) * next_v  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ilql_mod, "bellman_target", flipped)
        model, heads = train_tabular(episodes_batch(), tau=TAU, steps=STEPS)
    return max_errors(model, heads)


STEPS = 300
TAU = 0.995


def test_q_and_v_converge_to_optimal_values(flipped_errors: tuple[float, float]) -> None:
    model, heads = train_tabular(episodes_batch(), tau=TAU, steps=STEPS)
    q_err, v_err = max_errors(model, heads)
    q_fix, v_fix = max_errors(model, heads, tau=TAU)
    q0, v0 = learned(model, heads, ())
    print(f"\ncorrect sign: max|Q-Q*|={q_err:.4f} max|V-V*|={v_err:.4f} (vs tau fixed point {q_fix:.4f}, "
          f"{v_fix:.4f}); Q(s0)={[round(x, 3) for x in q0]} V(s0)={v0:.3f}; flipped sign: "
          f"max|Q-Q*|={flipped_errors[0]:.4f} max|V-V*|={flipped_errors[1]:.4f}")
    # ILQL's exact fixed point for tau = 0.995 (V a hair under the max) ...
    assert q_fix < 0.01 and v_fix < 0.01
    # ... which is within 0.05 of the optimal values computed by hand.
    assert q_err < 0.05 and v_err < 0.05
    assert abs(v0 - 1.62) < 0.05 and max(range(3), key=lambda i: q0[i]) == 0  # a1 = 1 beats the 0.5 trap
    # The same test with paper 1's flipped bootstrap sign must fail by a wide margin.
    assert flipped_errors[0] > 1.0 and flipped_errors[1] > 1.0


# ----------------------------------------------------------------------------------- expectiles


@pytest.mark.parametrize(("tau", "expected"), [(0.99, 2.98 / 1.01), (0.5, 4.0 / 3.0)])
def test_expectile_v_between_mean_and_max(tau: float, expected: float) -> None:
    """One state, dataset actions with Q = 0, 1, 3: V -> the tau-expectile (0.5: mean, -> 1: max)."""
    q_of = {1: 0.0, 2: 1.0, 3: 3.0}
    batch = episodes_batch(horizon=1, reward_fn=lambda prefix, a: q_of[a])
    model, heads = train_tabular(batch, tau=tau, steps=600, max_len=2)
    q, v = learned(model, heads, ())
    assert q == pytest.approx([0.0, 1.0, 3.0], abs=0.01)
    assert expectile([0.0, 1.0, 3.0], tau) == pytest.approx(expected, abs=1e-6)
    assert v == pytest.approx(expected, abs=0.01)
    if tau == 0.99:
        assert abs(v - 3.0) < 0.06  # close to the max over dataset actions
    else:
        assert abs(v - 4.0 / 3.0) < 0.01  # the mean


def test_expectile_loss_weights() -> None:
    diff = torch.tensor([2.0, -2.0, 0.0])
    assert expectile_loss(diff, 0.7).tolist() == pytest.approx([0.7 * 4, 0.3 * 4, 0.0])
    assert expectile_loss(diff, 0.5).tolist() == pytest.approx([2.0, 2.0, 0.0])


# ------------------------------------------------------------------------ pieces of the loss


def test_bellman_target_sign_and_terminal() -> None:
    r, v_next = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])
    y = ilql_mod.bellman_target(r, torch.tensor([0.0, 1.0]), v_next, 0.5)
    assert y.tolist() == [2.0, 1.0]  # r + gamma * V'; a done transition does not bootstrap


def test_next_state_positions_skip_observations() -> None:
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 0, 0]])
    pos = next_state_positions(mask)
    # Row 0: action 1 -> next action 2 is scored at hidden 1; action 2 -> next action 5, hidden 4;
    # action 5 is the last: the prefix through 5. Row 1: contiguous actions -> hidden t.
    assert pos[0, [1, 2, 5]].tolist() == [1, 4, 5]
    assert pos[1, [2, 3, 4]].tolist() == [2, 3, 4]


def test_guided_logits_formula() -> None:
    lm = torch.tensor([[0.0, 1.0, 2.0]])
    q = torch.tensor([[1.0, 0.0, -1.0]])
    v = torch.tensor([0.5])
    got = guided_logits(lm, q, v, beta=2.0)
    assert torch.allclose(got, torch.log_softmax(lm, -1) + 2.0 * (q - 0.5))
    assert torch.equal(guided_logits(lm, q, v, beta=0.0), torch.log_softmax(lm, -1))


# ------------------------------------------------------------------------------------- Polyak


def _params(module: nn.Module | None) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_polyak_update_rates() -> None:
    torch.manual_seed(0)
    heads = ILQLHeads(8, 11, two_q=True, hidden_mult=1)
    assert all(torch.equal(a, b) for a, b in zip(_params(heads.q1_head), _params(heads.target_q1), strict=True))
    assert not any(p.requires_grad for p in [*heads.target_q1.parameters(), *heads.target_q2.parameters()])
    with torch.no_grad():
        for p in [*heads.q1_head.parameters(), *heads.q2_head.parameters()]:
            p.add_(torch.randn_like(p))
    before = _params(heads.target_q1) + _params(heads.target_q2)
    online = _params(heads.q1_head) + _params(heads.q2_head)

    heads.polyak_update(0.0)
    assert all(torch.equal(a, b) for a, b in zip(_params(heads.target_q1) + _params(heads.target_q2), before,
                                                 strict=True))
    heads.polyak_update(0.25)
    after = _params(heads.target_q1) + _params(heads.target_q2)
    for a, b, o in zip(after, before, online, strict=True):
        assert torch.allclose(a, 0.25 * o + 0.75 * b, atol=1e-6) and not torch.equal(a, b)
    heads.polyak_update(1.0)
    assert all(torch.equal(a, o) for a, o in zip(_params(heads.target_q1) + _params(heads.target_q2), online,
                                                 strict=True))


def test_heads_config_rebuilds_same_shapes() -> None:
    heads = ILQLHeads(8, 11, two_q=False, hidden_mult=0)
    rebuilt = ILQLHeads(**heads.heads_config())
    rebuilt.load_state_dict(heads.state_dict())
    assert rebuilt.q2_head is None and rebuilt.target_q2 is None


# ------------------------------------------------------------------------- smoke on a real LM


def _lm_batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Prompt tokens are observations, response tokens are actions; the return sits on the last one."""
    rows = [(tok(p)["input_ids"], tok(r)["input_ids"]) for p, r in pairs]
    T = max(len(p) + len(r) for p, r in rows)
    batch = {k: torch.zeros(len(rows), T) for k in ("attention_mask", "action_mask", "rewards", "dones")}
    batch["input_ids"] = torch.full((len(rows), T), tok.pad_token_id)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        batch["input_ids"][i, :n] = torch.tensor(p + r)
        batch["attention_mask"][i, :n] = 1
        batch["action_mask"][i, len(p):n] = 1
        batch["rewards"][i, n - 1] = float(i % 2)
        batch["dones"][i, n - 1] = 1
    batch["attention_mask"] = batch["attention_mask"].long()
    return batch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_step_smoke_tiny_random(arch: str) -> None:
    from subq.learner.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(f"tiny-random:{arch}?hidden=32&heads=2")
    heads = ILQLHeads.for_model(model)
    algo = ILQL(model, heads, ILQLConfig(lr=1e-3, target_update_rate=0.5))
    batch = _lm_batch(tok, [("Q: 2+2?", " Q1: what is 2+2?"), ("Hi", " ok"), ("A longer prompt", " x")])
    lm_before, v_before, t_before = _params(model), _params(heads.v_head), _params(heads.target_q1)
    for _ in range(2):
        metrics = algo.train_step(batch)
    expected = {"losses/q", "losses/v", "losses/cql", "losses/bc", "losses/total", "charts/q_mean",
                "charts/v_mean", "charts/advantage_mean"}
    assert expected <= metrics.keys()
    assert all(isinstance(x, float) and torch.isfinite(torch.tensor(x)) for x in metrics.values())
    n_actions = int(batch["action_mask"][:, 1:].sum())
    assert metrics["charts/action_tokens"] == n_actions
    changed = lambda old, new: any(not torch.equal(a, b) for a, b in zip(old, new, strict=True))  # noqa: E731
    assert changed(v_before, _params(heads.v_head))
    assert changed(t_before, _params(heads.target_q1))
    assert changed(lm_before, _params(model))
    assert all(p.grad is None for p in heads.target_q1.parameters())


def test_empty_batch_and_evaluate() -> None:
    """A micro-batch without action tokens gives a zero loss that still backpropagates (DDP needs it)."""
    model = PrefixModel(max_len=2)
    algo = ILQL(model, ILQLHeads(model.n_codes, VOCAB, hidden_mult=0), ILQLConfig())
    batch = episodes_batch(horizon=1, reward_fn=lambda prefix, a: 1.0)
    metrics = algo.evaluate(batch)
    assert metrics["charts/val_action_tokens"] == 3 and "losses/val_total" in metrics
    batch["action_mask"].zero_()
    loss, metrics = algo.loss(batch)
    loss.backward()
    assert loss.item() == 0.0 and metrics["charts/action_tokens"] == 0


# ------------------------------------------------------- heads: size options, init, target warm-up


@pytest.mark.parametrize(("mult", "rank"), [(0, 0), (1, 0), (0, 4), (2, 4)])
def test_heads_rebuild_from_their_state_dict_alone(mult: int, rank: int) -> None:
    heads = ILQLHeads(8, 40, two_q=rank == 0, hidden_mult=mult, q_rank=rank)
    rebuilt = ILQLHeads.from_state_dict(heads.state_dict())
    assert rebuilt.heads_config() == heads.heads_config()
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), rebuilt.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ValueError, match="not an ILQL heads"):
        ILQLHeads.from_state_dict({"lm_head.weight": torch.zeros(2, 2)})


def test_low_rank_q_heads_are_small_at_a_large_vocabulary() -> None:
    full = ILQLHeads(64, 128_000, hidden_mult=1)
    low = ILQLHeads(64, 128_000, hidden_mult=1, q_rank=16)
    size = lambda m: sum(p.numel() for p in m.q1_head.parameters())  # noqa: E731
    assert size(full) == 64 * 64 + 64 + 64 * 128_000 + 128_000
    assert size(low) == 64 * 64 + 64 + 64 * 16 + 16 * 128_000 + 128_000  # ~4x fewer: 64 -> 16 wide
    h = torch.randn(3, 64)
    assert low.q1_head(h).shape == (3, 128_000) and low.decode_values(h)[0].shape == (3, 128_000)


def test_untrained_heads_barely_move_decoding_scores() -> None:
    """Near-zero output layers: Q and V of fresh heads are ~0.01, not the ~0.3 of a default init."""
    from subq.learner.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny-random:llama?hidden=32&heads=2")
    heads = ILQLHeads.for_model(model)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([list(b"Problem: 3 apples")]), output_hidden_states=True)
        h = hidden.hidden_states[-1][0]
        q, v = heads.decode_values(h)
    spread = float((q - v[:, None]).std())
    assert 0 < spread < 0.05
    assert not torch.equal(heads.q1_head(h), heads.q2_head(h))  # two heads that can learn apart


def test_target_warmup_keeps_the_running_mean_of_the_online_heads() -> None:
    model = PrefixModel(max_len=2)
    heads = ILQLHeads(model.n_codes, VOCAB, hidden_mult=0)
    algo = ILQL(model, heads, ILQLConfig(lr=0.05, target_update_rate=0.005, target_warmup=True))
    batch = episodes_batch(horizon=1, reward_fn=lambda prefix, a: float(a))
    history = [_params(heads.q1_head)]
    rates = []
    for _ in range(5):
        rates.append(algo.target_rate())
        algo.train_step(batch)
        history.append(_params(heads.q1_head))
    assert rates == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    mean = [torch.stack(ps).mean(0) for ps in zip(*history, strict=True)]
    assert all(torch.allclose(t, m, atol=1e-6) for t, m in zip(_params(heads.target_q1), mean, strict=True))
    late = ILQL(model, heads, ILQLConfig(target_update_rate=0.005, target_warmup=True))
    late.step = 500
    assert late.target_rate() == 0.005  # the constant rate once 1 / (step + 2) falls below it
    assert ILQL(model, heads, ILQLConfig(target_update_rate=0.005, target_warmup=False)).target_rate() == 0.005


def test_default_target_update_is_paper_1s_polyak_average() -> None:
    """Paper 1 / Snell et al.: target <- 0.005 * online + 0.995 * target from the first step (warm-up opt-in)."""
    model = PrefixModel(max_len=2)
    heads = ILQLHeads(model.n_codes, VOCAB, hidden_mult=0)
    algo = ILQL(model, heads, ILQLConfig(lr=0.05))
    assert (algo.cfg.target_update_rate, algo.cfg.target_warmup) == (0.005, False)
    before, online_before = _params(heads.target_q1), _params(heads.q1_head)
    assert algo.train_step(episodes_batch(horizon=1, reward_fn=lambda prefix, a: float(a)))["charts/target_rate"] == 0.005
    for t, t0, o in zip(_params(heads.target_q1), before, _params(heads.q1_head), strict=True):
        assert torch.allclose(t, 0.995 * t0 + 0.005 * o, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(online_before, _params(heads.q1_head), strict=True))
