"""ILQL's loss terms, each against a hand computation, and the fixed point with CQL and BC switched on.

``test_ilql.py`` checks the Bellman backup and the expectile with ``cql_alpha = bc_weight = 0``; these
tests pin the other two terms and the decoder's choice of Q, which that file could not see: a CQL term
with its sign flipped, ILQL's BC term scored one position off, and decoding with the online instead of
the target Q heads all pass it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from subq.learner.guided_decoding import generate_guided
from subq.learner.ilql import ILQL, ILQLConfig, ILQLHeads, next_state_positions
from subq.learner.models import load_model_and_tokenizer

from tests.test_ilql import PrefixModel, _lm_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ every term on a real LM, by hand

WEIGHTS = {"q_loss_weight": 1.3, "v_loss_weight": 0.7, "cql_alpha": 0.4, "bc_weight": 0.9}


@pytest.fixture(scope="module")
def lm_setup():
    model, tok = load_model_and_tokenizer("tiny-random:llama?hidden=32&heads=2&seed=3")
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model)
    with torch.no_grad():  # values of order 1 everywhere, online and target heads all different
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    batch = _lm_batch(tok, [("Q: 2+2?", " Q1: what is 2+2?"), ("Hi", " ok"), ("A longer prompt", " x y")])
    batch["rewards"][0, 12] = 0.5  # a reward inside an episode, not only on its last token
    return model, heads, batch


def _by_hand(model, heads, batch, cfg: ILQLConfig) -> dict[str, float]:
    """Every loss term from the definitions in ilql.py's docstring, one action at a time."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden, logits = out.hidden_states[-1], out.logits
        nxt = next_state_positions(batch["action_mask"])
        q_heads = [heads.q1_head, heads.q2_head]
        terms: dict[str, list[float]] = {"q": [], "v": [], "cql": [], "bc": []}
        for b, t in (batch["action_mask"][:, 1:] > 0).nonzero().tolist():
            t += 1  # token t is the action; its state is read at hidden[t - 1]
            a, h = int(batch["input_ids"][b, t]), hidden[b, t - 1]
            r, done = float(batch["rewards"][b, t]), float(batch["dones"][b, t])
            y = r + cfg.gamma * (1 - done) * float(heads.v_head(hidden[b, nxt[b, t]]))
            v = float(heads.v_head(h))
            target = min(float(heads.target_q1(h)[a]), float(heads.target_q2(h)[a]))
            u = target - v
            terms["q"].append(sum((float(q(h)[a]) - y) ** 2 for q in q_heads))
            terms["v"].append(abs(cfg.tau - (u < 0)) * u * u)
            terms["cql"].append(sum(float(torch.logsumexp(q(h), 0) - q(h)[a]) for q in q_heads))
            terms["bc"].append(float(-F.log_softmax(logits[b, t - 1], -1)[a]))  # the logits *before* token t
    means = {k: sum(v) / len(v) for k, v in terms.items()}
    means["total"] = (cfg.q_loss_weight * means["q"] + cfg.v_loss_weight * means["v"]
                      + cfg.cql_alpha * means["cql"] + cfg.bc_weight * means["bc"])
    return means


def test_each_loss_term_and_the_total_equal_the_hand_computation(lm_setup) -> None:
    model, heads, batch = lm_setup
    cfg = ILQLConfig(**WEIGHTS)
    loss, metrics = ILQL(model, heads, cfg).loss(batch)
    expected = _by_hand(model, heads, batch, cfg)
    for term in ("q", "v", "cql", "bc", "total"):
        assert metrics[f"losses/{term}"] == pytest.approx(expected[term], rel=1e-4), term
    assert loss.item() == pytest.approx(expected["total"], rel=1e-4)
    assert expected["cql"] > 0.5 and expected["bc"] > 0.5  # both terms are large enough to matter


# ------------------------------------------------------------- tabular fixed point with CQL and BC on
# Vocabulary = actions = {0, 1, 2} (token 0 is also the context token), horizon 2. In every state the
# data takes action b with frequency p_b = (1, 2, 3) / 6, so the LM head's BC optimum is log p and CQL's
# logsumexp runs over exactly the actions in the data. Per state, the stationary point of
#   sum_b p_b (Q_b - y_b)^2 + alpha * (logsumexp Q - sum_b p_b Q_b)
# is Q_b = y_b - alpha * (softmax(Q)_b - p_b) / (2 p_b), solved below by fixed-point iteration; V is the
# p-weighted tau-expectile of Q.

ACTS3 = (0, 1, 2)
MULT = {0: 1, 1: 2, 2: 3}
P = torch.tensor([1.0, 2.0, 3.0]) / 6
G3, TAU3, ALPHA = 0.9, 0.7, 0.5


def r3(prefix: tuple[int, ...], a: int) -> float:
    if not prefix:
        return 0.3 if a == 1 else 0.0
    return {0: 1.0, 1: 0.0, 2: 0.5}[a] * (1.0 if prefix[0] == 0 else 0.5)


def weighted_expectile(values: torch.Tensor, weights: torch.Tensor, tau: float) -> float:
    lo, hi = float(values.min()), float(values.max())
    for _ in range(100):
        mid = (lo + hi) / 2
        pull = sum(float(w) * (tau if x > mid else 1 - tau) * (float(x) - mid)
                   for x, w in zip(values, weights, strict=True))
        lo, hi = (mid, hi) if pull > 0 else (lo, mid)
    return (lo + hi) / 2


def cql_fixed_point(prefix: tuple[int, ...]) -> torch.Tensor:
    """Q(prefix, .) at the stationary point of the ILQL loss with CQL (see above)."""
    y = torch.tensor([r3(prefix, a) + (G3 * weighted_expectile(cql_fixed_point(prefix + (a,)), P, TAU3)
                                       if len(prefix) == 0 else 0.0) for a in ACTS3])
    q = y.clone()
    for _ in range(200):  # a contraction: alpha * max softmax' / (2 min p) < 1
        q = y - ALPHA * (q.softmax(0) - P) / (2 * P)
    return q


def cql_batch() -> dict[str, torch.Tensor]:
    rows = [r for r in itertools.product(ACTS3, repeat=2) for _ in range(MULT[r[0]] * MULT[r[1]])]
    ids = torch.tensor([(0, *r) for r in rows])
    rewards = torch.tensor([[0.0, r3((), r[0]), r3(r[:1], r[1])] for r in rows])
    action_mask = torch.tensor([[0.0, 1.0, 1.0]]).repeat(len(rows), 1)
    dones = torch.tensor([[0.0, 0.0, 1.0]]).repeat(len(rows), 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "action_mask": action_mask,
            "rewards": rewards, "dones": dones}


def test_cql_and_bc_reach_their_exact_fixed_points() -> None:
    torch.manual_seed(0)
    model = PrefixModel(vocab=3, max_len=3)
    heads = ILQLHeads(model.n_codes, 3, two_q=True, hidden_mult=0)
    # lr decayed to 0 over the run: at a constant lr Adam keeps oscillating around the fixed point
    cfg = ILQLConfig(gamma=G3, tau=TAU3, cql_alpha=ALPHA, bc_weight=1.0, target_update_rate=0.2, lr=0.02,
                     max_grad_norm=0.0, lr_decay="cosine", decay_steps=500)
    algo = ILQL(model, heads, cfg)
    batch = cql_batch()
    for _ in range(500):
        algo.train_step(batch)
    q_err = v_err = pi_err = 0.0
    for prefix in [(), (0,), (1,), (2,)]:
        h = model.hidden_of((0, *prefix))
        with torch.no_grad():
            ref = cql_fixed_point(prefix)
            for q in (heads.q1_head(h), heads.q2_head(h)):
                q_err = max(q_err, float((q - ref).abs().max()))
            v_err = max(v_err, abs(float(heads.v_head(h)) - weighted_expectile(ref, P, TAU3)))
            pi_err = max(pi_err, float((model.lm_head(h).softmax(0) - P).abs().max()))
    # how far CQL moves Q here: the test would not notice a wrong CQL term if this were small
    shift = max(float((cql_fixed_point(p) - _no_cql(p)).abs().max()) for p in [(), (0,)])
    print(f"\nmax |Q - Q_fix| {q_err:.4f}, |V - V_fix| {v_err:.4f}, |pi - p| {pi_err:.4f}; CQL shift {shift:.3f}")
    assert shift > 0.3
    assert q_err < 0.03 and v_err < 0.03 and pi_err < 0.01


def _no_cql(prefix: tuple[int, ...]) -> torch.Tensor:
    """Q without the conservative term (alpha 0): y itself."""
    return torch.tensor([r3(prefix, a) + (G3 * weighted_expectile(_no_cql(prefix + (a,)), P, TAU3)
                                          if len(prefix) == 0 else 0.0) for a in ACTS3])


# --------------------------------------------------------------------- decoding reads the target heads


def test_guided_decoding_uses_the_target_q_heads_not_the_online_ones() -> None:
    model, tok = load_model_and_tokenizer("tiny-random:llama?hidden=32&heads=2&seed=1")
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model).eval()
    with torch.no_grad():  # online and target heads that disagree strongly
        for online, target in ((heads.q1_head, heads.target_q1), (heads.q2_head, heads.target_q2)):
            for p, tp in zip(online.parameters(), target.parameters(), strict=True):
                p.normal_(0.0, 2.0)
                tp.normal_(0.0, 2.0)
    ids = torch.tensor([list(b"Problem: 3 apples\nSub-questions:\n")])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        h, logp = out.hidden_states[-1][0, -1], F.log_softmax(out.logits[0, -1], -1)
        target_q = torch.minimum(heads.target_q1(h), heads.target_q2(h))
        online_q = torch.minimum(heads.q1_head(h), heads.q2_head(h))
        v = heads.v_head(h)
    q, v_dec = heads.decode_values(h)
    assert torch.equal(q, target_q) and torch.equal(v_dec, v.squeeze(-1))
    beta = 5.0
    by_target, by_online = int((logp + beta * target_q).argmax()), int((logp + beta * online_q).argmax())
    assert by_target != by_online  # the test can tell the two apart
    first = generate_guided(model, heads, ids, max_new_tokens=1, beta=beta, eos_token_id=None)[0, -1]
    assert int(first) == by_target
