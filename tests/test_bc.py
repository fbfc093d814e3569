"""BC (learner/bc.py) and filtered BC (learner/filtered_bc.py) on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from subq.learner.bc import BC, BCConfig
from subq.learner.episodes import Episode, build_episode, collate, encode_prompt
from subq.learner.filtered_bc import FilteredBC, FilteredBCConfig, select
from subq.learner.models import load_model_and_tokenizer
from subq.protocol.prompts import SUBQ_END, parse_student_output

TOY = [  # short, distinct problems: the prompt's first bytes decide which target follows
    ("Ann has 3 cats.", ["How many cats?"]),
    ("Bob runs 2 km.", ["How far?", "How fast?"]),
    ("Cy buys 5 pens.", ["What is the cost?"]),
]


def _ep(correct: float, usefulness: list[float], key: str, problem: str = "p") -> Episode:
    return Episode(input_ids=[1, 2], action_mask=[0, 1], rewards=[0.0, correct], dones=[0, 1],
                   subq_end_positions=[1], correct=correct, usefulness=usefulness, sample_key=key,
                   problem_id=problem)


# --------------------------------------------------------------------------------------- filtered BC

POOL = [
    _ep(0.0, [1.0, 1.0, 1.0], "a"),  # correctness 0, usefulness 3.0, both 1.0
    _ep(1.0, [0.0], "b"),  # 1, 0.0, 1.0
    _ep(1.0, [1.0, 0.5], "c"),  # 1, 1.5, 1.75
    _ep(0.0, [0.5], "d"),  # 0, 0.5, 0.5
    _ep(1.0, [0.5, 0.5], "e"),  # 1, 1.0, 1.5
    _ep(0.0, [], "f"),  # 0, 0.0, 0.0
]


def _keys(episodes: list[Episode]) -> list[str]:
    return [ep.sample_key for ep in episodes]


def test_default_is_paper_1s_rule_every_correct_decomposition():
    cfg = FilteredBCConfig()
    assert (cfg.correct_only, cfg.fraction) == (True, 1.0)
    assert _keys(select(POOL, cfg)) == ["b", "c", "e"]  # all correct ones, however many there are
    mostly_wrong = [_ep(0.0, [1.0], str(i)) for i in range(9)] + [_ep(1.0, [0.0], "ok")]
    assert _keys(select(mostly_wrong, cfg)) == ["ok"]  # never trains on an incorrect one


@pytest.mark.parametrize(
    ("kind", "fraction", "expected"),
    [
        ("both", 0.5, ["c", "e", "a"]),  # top 3 by both: c 1.75, e 1.5, then a/b tie at 1.0 -> key a
        ("usefulness", 0.5, ["a", "c", "e"]),
        ("correctness", 0.5, ["b", "c", "e"]),
        ("correctness", 1 / 3, ["b", "c"]),  # ties at 1.0: the two smallest keys
        ("both", 0.01, ["c"]),  # at least one
        ("usefulness", 1.0, ["a", "b", "c", "d", "e", "f"]),
    ],
)
def test_select_keeps_the_top_fraction_by_return(kind, fraction, expected):
    cfg = FilteredBCConfig(fraction=fraction, return_kind=kind, correct_only=False, rank_within="global")
    kept = select(POOL, cfg)
    assert sorted(_keys(kept)) == sorted(expected)
    assert _keys(kept) == [k for k in _keys(POOL) if k in expected]  # original order
    assert len(kept) == max(1, round(fraction * len(POOL)))


def test_select_ranks_within_each_problem():
    # problem x: all correct; problem y: none correct. A global top half keeps only x's.
    pool = [_ep(1.0, [u], f"x{u}", "x") for u in (0.1, 0.2, 0.3, 0.4)] + \
        [_ep(0.0, [u], f"y{u}", "y") for u in (0.1, 0.2, 0.3, 0.4)]
    per_problem = FilteredBCConfig(fraction=0.5, correct_only=False)
    assert per_problem.rank_within == "problem"
    assert _keys(select(pool, per_problem)) == ["x0.3", "x0.4", "y0.3", "y0.4"]
    glob = FilteredBCConfig(fraction=0.5, correct_only=False, rank_within="global")
    assert _keys(select(pool, glob)) == ["x0.1", "x0.2", "x0.3", "x0.4"]


def test_select_tie_breaking_is_by_key_not_input_order():
    ties = [_ep(1.0, [0.5], str(i)) for i in range(10)]
    for within in ("problem", "global"):
        cfg = FilteredBCConfig(fraction=0.3, return_kind="both", rank_within=within)
        assert _keys(select(ties, cfg)) == ["0", "1", "2"]
        assert _keys(select(ties[::-1], cfg)) == ["2", "1", "0"]  # the same set, in input order


def test_select_correct_only_screens_before_the_fraction():
    cfg = FilteredBCConfig(fraction=2 / 3, return_kind="usefulness", correct_only=True)
    assert _keys(select(POOL, cfg)) == ["c", "e"]  # of b, c, e keep round(2/3 * 3) = 2 by usefulness
    all_correct = dataclasses.replace(cfg, fraction=1.0)
    assert _keys(select(POOL, all_correct)) == ["b", "c", "e"]
    assert select([ep for ep in POOL if ep.correct == 0.0], cfg) == []
    assert select([], cfg) == []


def test_select_rejects_bad_config():
    with pytest.raises(ValueError, match="fraction"):
        select(POOL, FilteredBCConfig(fraction=0.0))
    with pytest.raises(ValueError, match="return_kind"):
        select(POOL, FilteredBCConfig(return_kind="reward"))
    with pytest.raises(ValueError, match="rank_within"):
        select(POOL, FilteredBCConfig(rank_within="batch"))


# ------------------------------------------------------------------------------------------------ BC


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine runs ~40x faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return load_model_and_tokenizer("tiny-random:llama")


def test_bc_loss_is_cross_entropy_on_action_tokens_only(tiny):
    model, tok = tiny
    eps = [build_episode(tok, p, q, usefulness=None, correct=1.0, placement="sparse") for p, q in TOY]
    batch = collate(eps, tok.pad_token_id)
    bc = BC(model, BCConfig())
    loss, metrics = bc.loss(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = [F.cross_entropy(logits[b, t - 1], batch["input_ids"][b, t], reduction="sum")
             for b, t in batch["action_mask"].nonzero().tolist()]
    n_actions = sum(sum(ep.action_mask) for ep in eps)
    assert metrics["charts/action_tokens"] == n_actions == len(terms)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert metrics["losses/bc"] == pytest.approx(loss.item())
    val = bc.evaluate(batch)  # tiny llama has no dropout: eval mode gives the same loss
    assert val["losses/val_bc"] == pytest.approx(loss.item(), rel=1e-5) and model.training


def test_bc_clones_a_toy_dataset_exactly(tiny):
    model, tok = tiny
    eps = [build_episode(tok, p, q, usefulness=None, correct=1.0, placement="sparse") for p, q in TOY]
    batch = collate(eps, tok.pad_token_id)
    bc = BC(model, BCConfig(lr=3e-3, max_grad_norm=1.0, warmup_steps=5))
    first = bc.train_step(batch)
    assert {"losses/bc", "charts/action_tokens", "charts/grad_norm", "charts/lr"} <= set(first)
    assert first["charts/lr"] == pytest.approx(3e-3 / 5)  # warmup: step 1 of 5
    for _ in range(300):
        metrics = bc.train_step(batch)
        if metrics["losses/bc"] < 0.01:
            break
    assert metrics["losses/bc"] < 0.05 < first["losses/bc"]
    assert bc.step > 1

    model.eval()
    for (problem, subqs), ep in zip(TOY, eps, strict=True):
        prompt = torch.tensor([encode_prompt(tok, problem)])
        n_actions = sum(ep.action_mask)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_actions,
                                 do_sample=False)
        text = tok.decode(out[0, prompt.shape[1]:])
        assert text.endswith(SUBQ_END) and parse_student_output(text) == subqs


def test_bc_trains_only_lora_weights_of_a_peft_model(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    ep = build_episode(tok, *TOY[0], usefulness=None, correct=1.0, placement="sparse")
    bc = BC(peft_model, BCConfig(lr=1e-2))
    for _ in range(2):
        metrics = bc.train_step(collate([ep], tok.pad_token_id))
    assert metrics["charts/grad_norm"] > 0
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())


def test_filtered_bc_is_bc_on_the_selection(tiny):
    model, tok = tiny
    eps = [build_episode(tok, p, q, usefulness=[1.0] * len(q), correct=float(i != 1), placement="full")
           for i, (p, q) in enumerate(TOY)]
    fbc = FilteredBC(model, FilteredBCConfig(fraction=1.0, correct_only=True))
    chosen = fbc.select(eps)
    assert chosen == [eps[0], eps[2]]
    metrics = fbc.train_step(collate(chosen, tok.pad_token_id))
    assert metrics["charts/action_tokens"] == sum(sum(ep.action_mask) for ep in chosen)


def test_lr_schedules_warm_up_then_decay_to_the_floor(tiny):
    from subq.learner.optim import lr_factor

    cos = BCConfig(warmup_steps=2, lr_decay="cosine", decay_steps=12, min_lr_ratio=0.1)
    assert [lr_factor(s, cos) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cos) == pytest.approx(1.0) and lr_factor(7, cos) == pytest.approx(0.55)  # half way
    assert lr_factor(12, cos) == pytest.approx(0.1) and lr_factor(50, cos) == pytest.approx(0.1)
    lin = dataclasses.replace(cos, lr_decay="linear", min_lr_ratio=0.0)
    assert [round(lr_factor(s, lin), 6) for s in (2, 7, 12)] == [1.0, 0.5, 0.0]
    assert lr_factor(1000, BCConfig()) == 1.0  # the default: constant after warmup
    model, tok = tiny
    bc = BC(model, dataclasses.replace(lin, lr=1e-3))
    ep = build_episode(tok, *TOY[0], usefulness=None, correct=1.0, placement="sparse")
    lrs = [bc.train_step(collate([ep], tok.pad_token_id))["charts/lr"] for _ in range(8)]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, lin) for s in range(8)])
    with pytest.raises(ValueError, match="decay_steps"):
        BC(model, BCConfig(lr_decay="cosine"))
    with pytest.raises(ValueError, match="lr_decay"):
        BC(model, BCConfig(lr_decay="step"))
