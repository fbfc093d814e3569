"""Episodes (learner/episodes.py): token positions, reward placement, exclusion and the batch contract.

The tiny byte tokenizer maps every byte to one token, so every position below is counted by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from subq.learner.episodes import (
    Episode,
    build_episode,
    collate,
    encode_prompt,
    episode_return,
    episodes_from_samples,
    fit_context,
    reference_episodes,
)
from subq.learner.models import ModelError, build_byte_tokenizer, load_tokenizer
from subq.protocol.prompts import student_prompt, student_target

PROBLEM = "1+1?"
SUBQS = ["Ab?", "C?"]
# "Problem: 1+1?\nSub-questions:\n" = 9 + 4 + 1 + 14 + 1 = 29 bytes;
# target "Ab?\nC?\n<end>": "Ab?" at 29..31, "\n" 32, "C?" 33..34, "\n" 35, "<end>" 36..40.
N_CTX, N = 29, 41
END_AB, END_C, LAST = 31, 34, 40


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _row(**kw):
    row = {"status": "ok", "question": PROBLEM, "subquestions": SUBQS, "usefulness": [0.5, 1.0],
           "correct": True, "sample_key": "k"}
    return {**row, **kw}


def test_positions_are_the_hand_counted_ones(tok):
    ep = build_episode(tok, PROBLEM, SUBQS, usefulness=[0.25, 0.75], correct=1.0)
    assert len(student_prompt(PROBLEM).encode()) == N_CTX
    assert ep.input_ids == list(student_prompt(PROBLEM).encode()) + list(student_target(SUBQS).encode())
    assert len(ep.input_ids) == N and len(ep.rewards) == N and len(ep.dones) == N
    assert ep.action_mask == [0] * N_CTX + [1] * (N - N_CTX)
    assert tok.decode([t for t, m in zip(ep.input_ids, ep.action_mask, strict=True) if m]) == "Ab?\nC?\n<end>"
    assert ep.subq_end_positions == [END_AB, END_C]
    assert chr(ep.input_ids[END_AB]) == "?" and chr(ep.input_ids[END_AB + 1]) == "\n"
    assert ep.dones == [0] * LAST + [1]
    assert ep.input_ids[: N_CTX] == encode_prompt(tok, PROBLEM)  # what serving feeds the model


def test_full_and_sparse_reward_placement_token_by_token(tok):
    full = build_episode(tok, PROBLEM, SUBQS, usefulness=[0.25, 0.75], correct=1.0, placement="full")
    expected = [0.0] * N
    expected[END_AB], expected[END_C], expected[LAST] = 0.25, 0.75, 1.0
    assert full.rewards == expected

    sparse = build_episode(tok, PROBLEM, SUBQS, usefulness=[0.25, 0.75], correct=1.0, placement="sparse")
    assert sparse.rewards == [0.0] * LAST + [1.0]
    assert sparse.usefulness == [0.25, 0.75]  # kept for ranking, not placed

    wrong = build_episode(tok, PROBLEM, SUBQS, usefulness=[0.25, 0.75], correct=0.0, placement="sparse")
    assert wrong.rewards == [0.0] * N and wrong.dones[LAST] == 1


def test_single_subquestion_reward_is_not_on_the_last_token(tok):
    ep = build_episode(tok, PROBLEM, ["Ab?"], usefulness=[0.5], correct=1.0)
    # "Ab?\n<end>": "?" at 31, then "\n<end>" up to 37
    assert ep.subq_end_positions == [31] and len(ep.input_ids) == 38
    assert [(i, r) for i, r in enumerate(ep.rewards) if r] == [(31, 0.5), (37, 1.0)]


def test_truncation_cuts_the_middle_of_the_problem_and_keeps_the_header(tok):
    problem = "Ann has 3 red cats and 4 blue dogs in a big old house. How many pets does Ann have?"
    full = encode_prompt(tok, problem)
    n_actions = N - N_CTX  # 12
    ep = build_episode(tok, problem, SUBQS, usefulness=[0.0, 0.0], correct=1.0, max_length=n_actions + 60)
    assert len(ep.input_ids) <= n_actions + 60 < len(full) + n_actions
    context = tok.decode(ep.input_ids[: len(ep.input_ids) - n_actions])
    # the header serving always sends, the problem's start and its question stay; its middle goes
    assert context.startswith("Problem: Ann has") and context.endswith("does Ann have?\nSub-questions:\n")
    assert " ... " in context and "blue dogs" not in context
    assert ep.cut_words == len(problem.split()) - len(context.split()) + 3  # "Problem:", "...", "Sub-questions:"
    assert ep.input_ids[: len(ep.input_ids) - n_actions] == fit_context(tok, problem, 60)[0]
    assert tok.decode(ep.input_ids[-n_actions:]) == "Ab?\nC?\n<end>"  # actions are never cut
    assert ep.subq_end_positions[0] == len(ep.input_ids) - n_actions + 2
    # a prompt that fits is encode_prompt's, untouched
    assert fit_context(tok, problem, len(full)) == (full, 0)
    # not even "Problem: ...\nSub-questions:\n" (28 bytes) fits: dropped
    assert build_episode(tok, problem, SUBQS, usefulness=[0, 0], correct=1, max_length=n_actions + 28) is not None
    assert build_episode(tok, problem, SUBQS, usefulness=[0, 0], correct=1, max_length=n_actions + 27) is None
    assert build_episode(tok, PROBLEM, SUBQS, usefulness=[0, 0], correct=1, max_length=n_actions) is None


def test_invalid_inputs_raise(tok):
    with pytest.raises(ValueError):
        build_episode(tok, PROBLEM, SUBQS, usefulness=[1.0], correct=1.0)  # full needs one per sub-question
    with pytest.raises(ValueError):
        build_episode(tok, PROBLEM, [], usefulness=[], correct=1.0)
    with pytest.raises(ValueError):
        build_episode(tok, PROBLEM, SUBQS, usefulness=None, correct=1.0, placement="dense")


def test_exclusion_reasons_are_counted(tok):
    rows = [
        _row(),
        _row(status="parse_error", subquestions=None),
        _row(status="api_error"),
        _row(status="api_error"),
        _row(subquestions=None),
        _row(subquestions=["ok?", "  "]),
        _row(usefulness=None),
        _row(usefulness=[0.5, None]),
        _row(usefulness=[0.5]),
        _row(question="x" * 600),  # context is cut, still fits
        _row(subquestions=["y" * 600], usefulness=[1.0]),
        _row(correct=None, sample_key="nocorrect"),
    ]
    episodes, excluded = episodes_from_samples(rows, tok, placement="full", max_length=512)
    assert [ep.cut_words for ep in episodes] == [0, 1, 0]  # the 600-byte word went, the header stayed
    assert excluded == {"parse_error": 1, "api_error": 2, "no_subquestions": 2, "no_usefulness": 3, "too_long": 1}
    assert len(episodes) == 3
    assert [ep.correct for ep in episodes] == [1.0, 1.0, 0.0]
    assert episodes[2].sample_key == "nocorrect" and episodes[2].rewards[-1] == 0.0

    sparse, excluded = episodes_from_samples(rows, tok, placement="sparse", max_length=512)
    assert excluded == {"parse_error": 1, "api_error": 2, "no_subquestions": 2, "too_long": 1}
    assert len(sparse) == 6
    assert [ep.usefulness for ep in sparse[1:4]] == [[], [], []]  # unknown usefulness


def test_rows_from_pandas_style_batches(tok):
    # Ray Data / pandas hand lists over as numpy arrays and nulls as NaN
    row = _row(subquestions=np.array(SUBQS, dtype=object), usefulness=np.array([0.25, 0.75]), correct=math.nan)
    (ep,), excluded = episodes_from_samples([row], tok)
    assert excluded == {} and ep.correct == 0.0
    assert ep.rewards[END_AB] == 0.25 and ep.rewards[LAST] == 0.0


def test_reference_episodes(tok):
    rows = [
        {"question": PROBLEM, "reference_subquestions": SUBQS},
        {"question": PROBLEM, "reference_subquestions": None},
        {"question": PROBLEM, "reference_subquestions": []},
    ]
    (ep,) = reference_episodes(rows, tok)
    assert ep.correct == 1.0 and ep.usefulness == [1.0, 1.0]
    assert [(i, r) for i, r in enumerate(ep.rewards) if r] == [(END_AB, 1.0), (END_C, 1.0), (LAST, 1.0)]
    assert reference_episodes(rows, tok, max_length=10) == []


def test_collate_pads_right_with_the_contract_dtypes(tok):
    a = build_episode(tok, PROBLEM, SUBQS, usefulness=[0.25, 0.75], correct=1.0)
    b = build_episode(tok, PROBLEM, ["Ab?"], usefulness=[0.5], correct=0.0)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "action_mask", "rewards", "dones", "subq_mask"}
    assert all(v.shape == (2, N) for v in batch.values())
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert all(batch[k].dtype == torch.float32 for k in ("action_mask", "rewards", "dones", "subq_mask"))
    assert batch["input_ids"][1, 38:].tolist() == [tok.pad_token_id] * 3
    assert batch["attention_mask"][1].tolist() == [1] * 38 + [0] * 3
    assert batch["action_mask"][1].tolist() == [0.0] * N_CTX + [1.0] * 9 + [0.0] * 3
    assert batch["dones"].sum(1).tolist() == [1.0, 1.0] and batch["dones"][1, 37] == 1.0
    assert batch["rewards"][0].tolist() == a.rewards
    assert batch["action_mask"][:, 0].sum() == 0  # the first token is never an action


def test_episode_return_kinds():
    ep = Episode(input_ids=[1, 2], action_mask=[0, 1], rewards=[0, 1], dones=[0, 1], subq_end_positions=[1],
                 correct=1.0, usefulness=[0.5, 1.0, 0.0])
    assert episode_return(ep, "correctness") == 1.0
    assert episode_return(ep, "usefulness") == 1.5
    assert episode_return(ep, "both") == 1.5
    ep.usefulness = []
    assert episode_return(ep, "both") == 1.0 and episode_return(ep, "usefulness") == 0.0
    with pytest.raises(ValueError):
        episode_return(ep, "reward")


def test_smollm2_tokenizer_has_no_bos_and_exact_boundaries():
    try:
        tok = load_tokenizer("embedded:smollm2-135m-instruct")
    except ModelError as e:
        pytest.skip(f"embedded model not available: {e}")
    ep = build_episode(tok, PROBLEM, SUBQS, usefulness=[0.25, 0.75], correct=1.0)
    n_ctx = ep.action_mask.index(1)
    assert ep.input_ids[:n_ctx] == encode_prompt(tok, PROBLEM)
    assert tok.bos_token_id not in ep.input_ids
    assert tok.decode(ep.input_ids[:n_ctx]) == student_prompt(PROBLEM)
    assert tok.decode(ep.input_ids[n_ctx:]) == student_target(SUBQS)
    for end, text in zip(ep.subq_end_positions, ["Ab?", "Ab?\nC?"], strict=True):
        assert tok.decode(ep.input_ids[n_ctx: end + 1]) == text


def test_subquestion_mask_covers_exactly_the_subquestion_text():
    from subq.learner.episodes import build_episode, collate, subquestion_mask
    from subq.learner.models import load_tokenizer

    tok = load_tokenizer("tiny-random:llama")
    subqs = ["How many apples?", "How many now?"]
    ep = build_episode(tok, "Tom has 3 apples.", subqs, usefulness=None, correct=1.0, placement="sparse")
    mask = subquestion_mask(ep)
    assert tok.decode([t for t, m in zip(ep.input_ids, mask, strict=True) if m]) == "".join(subqs)
    assert all(a for a, m in zip(ep.action_mask, mask, strict=True) if m)  # only actions
    assert sum(mask) < sum(ep.action_mask)  # separators and the end marker are actions but not scored
    assert collate([ep], tok.pad_token_id)["subq_mask"][0].tolist() == mask
