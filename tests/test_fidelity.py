"""Fidelity measures: NLL on exactly the sub-question tokens, generation measures, value AUC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from subq.evaluation.fidelity import (
    auc,
    chat_scored,
    generation_measures,
    reference_nll,
    student_scored,
    token_nll,
    value_scores,
)
from subq.evaluation.run import EvalConfig
from subq.learner.ilql import ILQLHeads
from subq.learner.models import load_model_and_tokenizer

PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have?"
SUBQS = ["How many apples does Tom buy?", "How many apples does Tom have now?"]


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    model, tok = load_model_and_tokenizer("tiny-random:llama")
    return model, tok


def _scored_text(tok, scored) -> str:
    return tok.decode([t for t, m in zip(scored.input_ids, scored.score_mask, strict=True) if m])


@pytest.mark.parametrize("builder", [student_scored, chat_scored])
def test_only_the_subquestion_text_is_scored(tiny, builder):
    _, tok = tiny
    scored = builder(tok, PROBLEM, SUBQS)
    text = _scored_text(tok, scored)
    # exactly the words of the sub-questions: no prompt, no "Q1:", no separator, no end marker
    assert text.replace(" ", "") == "".join(SUBQS).replace(" ", "")
    assert "Q1" not in text and "<end>" not in text and "\n" not in text
    assert scored.score_mask[0] == 0


def test_nll_is_hand_computed_over_the_scored_tokens(tiny):
    model, tok = tiny
    items = [student_scored(tok, PROBLEM, SUBQS), student_scored(tok, "A short one?", ["Why?"]),
             chat_scored(tok, PROBLEM, SUBQS)]
    got = token_nll(model, items, batch_size=2, pad_id=tok.pad_token_id)  # padded batches
    for item, (total, count) in zip(items, got, strict=True):
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        expected, n = 0.0, 0
        for t in range(1, len(item.input_ids)):  # token t is predicted by the logits at t - 1
            if item.score_mask[t]:
                expected -= float(F.log_softmax(logits[t - 1], -1)[item.input_ids[t]])
                n += 1
        assert count == n == sum(item.score_mask)
        assert total == pytest.approx(expected, rel=1e-4)


def test_reference_nll_is_the_token_weighted_mean(tiny):
    model, tok = tiny
    pairs = [(PROBLEM, SUBQS), ("A short one?", ["Why?"]), ("No reference here", [])]
    out = reference_nll(model, tok, pairs, "student", batch_size=3)
    sums = token_nll(model, [student_scored(tok, p, q) for p, q in pairs[:2]], pad_id=tok.pad_token_id)
    assert out["n"] == 2 and out["tokens"] == sum(c for _, c in sums)
    assert out["nll_per_token"] == pytest.approx(sum(s for s, _ in sums) / out["tokens"])
    # a random byte model is near-uniform over its ~260 tokens
    assert 0.5 * math.log(260) < out["nll_per_token"] < 2 * math.log(260)


def test_training_on_the_reference_lowers_its_nll(tiny):
    """The measure must move when a model learns the scored tokens (and not when it learns others)."""
    model, tok = tiny
    model = type(model)(model.config)  # a private copy: the fixture's model stays untouched
    model.load_state_dict(tiny[0].state_dict())
    item = student_scored(tok, PROBLEM, SUBQS)
    before = token_nll(model, [item], pad_id=tok.pad_token_id)[0][0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([item.input_ids])
    mask = torch.tensor(item.score_mask[1:], dtype=torch.bool)
    for _ in range(30):
        logits = model(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits[mask], ids[0, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = token_nll(model, [item], pad_id=tok.pad_token_id)[0][0]
    assert after < 0.5 * before


def test_generation_measures():
    outs = [{"subquestions": ["How many apples does Tom buy?"], "finish_reason": "stop"},
            {"subquestions": [], "finish_reason": "length"},
            {"subquestions": ["a?", "b?", "c?"], "finish_reason": "length"},
            {"subquestions": ["x?"], "finish_reason": "error"}]
    refs = [SUBQS, SUBQS, None, ["x?"]]
    m = generation_measures(outs, refs)
    assert m["problems"] == 4
    assert m["parse_rate"] == 0.75 and m["stop_rate"] == 0.25
    assert m["n"] == 3 and m["skipped_no_reference"] == 1  # the empty output is compared (ROUGE 0)
    assert m["subquestions"] == pytest.approx(5 / 4)
    assert 0 < m["rougeL"] < 1
    with pytest.raises(ValueError):
        generation_measures(outs, refs[:2])


def test_auc_matches_pairwise_definition():
    scores = [0.9, 0.8, 0.8, 0.3, 0.1, 0.8, 0.5]
    labels = [True, True, False, True, False, False, False]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    out = auc(scores, labels)
    assert out["auc"] == pytest.approx(pairwise)
    assert out["low"] <= out["auc"] <= out["high"] and out["positives"] == 3 and out["negatives"] == 4
    assert auc([1, 2, 3, 4], [False, False, True, True])["auc"] == 1.0
    assert auc([1, 2, 3, 4], [True, True, False, False])["auc"] == 0.0
    assert auc([1, 2], [True, True])["auc"] is None
    wide, narrow = auc(scores, labels), auc(scores * 20, labels * 20)
    assert narrow["high"] - narrow["low"] < wide["high"] - wide["low"]  # more data, tighter interval


def test_value_scores_read_the_heads(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model, hidden_mult=0)
    pairs = [(PROBLEM, SUBQS), ("A short one?", ["Why?"])]
    out = value_scores(model, heads, tok, pairs, batch_size=2)
    assert {k: len(v) for k, v in out.items()} == {"q_last": 2, "v_last": 2, "advantage": 2}
    # a Q head that pays exactly on the last action token's id: q_last must see it
    last_ids = set()
    for p, q in pairs:
        scored = student_scored(tok, p, q)
        last_ids.add(scored.input_ids[-1])
    with torch.no_grad():
        for target in (heads.target_q1, heads.target_q2):
            target.weight.zero_()
            target.bias.zero_()
            for i in last_ids:
                target.bias[i] = 5.0
    out = value_scores(model, heads, tok, pairs, batch_size=1)
    assert out["q_last"] == pytest.approx([5.0, 5.0])


def test_held_out_nll_for_the_report_is_reference_nll_and_kept_until_the_weights_change(tmp_path):
    from subq.evaluation.fidelity import held_out_nll, reference_nll
    from subq.evaluation.fidelity_report import read_fidelity, update_fidelity

    problems = [{"question": "Tom has 3 apples and buys 2. How many now?", "reference_subquestions": [
        "How many apples does Tom buy?", "How many apples does Tom have now?"]},
        {"question": "No reference here.", "reference_subquestions": None}]
    spec = "tiny-random:llama?layers=1&hidden=32&seed=0"
    model, tok = load_model_and_tokenizer(spec)
    want = reference_nll(model, tok, [(problems[0]["question"], problems[0]["reference_subquestions"])], "chat")
    got = held_out_nll(spec, "chat", problems)
    assert got["n"] == 1 and got["nll_per_token"] == pytest.approx(want["nll_per_token"], rel=1e-6)
    said: list[str] = []
    from unittest import mock

    with mock.patch("subq.data_store.datasets.load_problems", return_value=problems):
        update_fidelity(str(tmp_path), "gsm8k:test[:2]", [("zero-shot", spec, "chat")], echo=said.append)
        update_fidelity(str(tmp_path), "gsm8k:test[:2]", [("zero-shot", spec, "chat")], echo=said.append)
        assert len(said) == 1  # the second run found the figure and computed nothing
        update_fidelity(str(tmp_path), "gsm8k:test[:3]", [("zero-shot", spec, "chat")], echo=said.append)
        assert len(said) == 2  # other problems: computed again
        assert read_fidelity(str(tmp_path)) == {"zero-shot": pytest.approx(want["nll_per_token"], rel=1e-6)}
        update_fidelity(str(tmp_path), "gsm8k:test[:3]", [("zero-shot", spec, "chat")], echo=said.append, bf16=True)
        assert len(said) == 3  # another precision: computed again
    # under bf16 autocast: close to the fp32 figure, not equal to it
    bf16 = read_fidelity(str(tmp_path))["zero-shot"]
    assert bf16 != want["nll_per_token"] and bf16 == pytest.approx(want["nll_per_token"], rel=2e-2)
    with pytest.raises(ValueError, match="fidelity_cpu_bf16"):
        EvalConfig(fidelity_cpu_bf16="fast")
