"""How faithful a decomposer is to reference decompositions: measures that move on a CPU.

A 135M solver answers almost nothing right, so answer accuracy cannot show that a student learned to
decompose. These measures can:

- **teacher-forced NLL** (:func:`reference_nll`): the mean negative log-likelihood, per token, of a
  reference decomposition's *sub-question text tokens* given the problem (the GSM8K socratic human
  sub-questions, or ChatGPT's from GSM8K-AI-SubQ). Only the tokens of the sub-questions' own text are
  scored, never the prompt, the separators, "Q1:" prefixes or the end marker, so a student (student
  format) and the zero-shot base model (the teacher's few-shot prompt, "Q1: ..." lines) are scored on
  the same words. Each format is tokenised as the model reads it: a student exactly as in training
  (``learner.episodes.build_episode``: pieces tokenised separately), the chat format canonically, with
  the sub-question tokens found through the tokenizer's character offsets.
- **generation measures** (:func:`generation_measures`): on decompositions the decomposer generated,
  ROUGE-L and count difference against the human ones, the share that parse into sub-questions, and
  the share that stopped by themselves (end marker / EOS) before the token limit.
- **value diagnostic** for ILQL (:func:`value_scores`, :func:`auc`): how well the learned values rank
  rewarded decompositions above unrewarded ones (ROC AUC with a 95% interval).

No Ray here: the functions take a loaded model and run in any process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import torch
import torch.nn.functional as F
from subq.evaluation.similarity import aggregate_similarity
from subq.learner.episodes import build_episode, subquestion_mask
from subq.protocol.prompts import decompose_messages, format_subquestions
from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMATS = ("student", "chat")


@dataclass
class Scored:
    """One (problem, reference) pair as model input: the ids and which tokens are scored."""

    input_ids: list[int]
    score_mask: list[int]  # 1 on the sub-question text tokens: their NLL is what is measured


def student_scored(tokenizer: PreTrainedTokenizerBase, problem: str, subquestions: Sequence[str]) -> Scored:
    """The student's episode (prompt + target, tokenised as in training) with its sub-question tokens marked.

    The target is ``q1 SEP q2 SEP ... <end>``, each piece tokenised on its own (``build_episode``); the
    scored tokens are the episode's ``subquestion_mask``, what the learner's validation scores too.
    """
    ep = build_episode(tokenizer, problem, list(subquestions), usefulness=None, correct=0.0, placement="sparse",
                       max_length=1 << 30)
    assert ep is not None  # only None when the target does not fit max_length
    return Scored(ep.input_ids, subquestion_mask(ep))


def chat_scored(tokenizer: PreTrainedTokenizerBase, problem: str, subquestions: Sequence[str]) -> Scored:
    """The zero-shot teacher prompt (chat template) continued by "Q1: ..." lines, tokenised canonically.

    A token is scored when its characters overlap a sub-question's text (not its "Qi: " prefix or the
    newline); a token that also carries the space after "Qi:" counts, as the word is in it.
    """
    prompt = tokenizer.apply_chat_template(decompose_messages(problem), tokenize=False, add_generation_prompt=True)
    target = format_subquestions(list(subquestions))
    spans, offset = [], len(prompt)
    for line in target.split("\n"):
        head = line.index(": ") + 2  # format_subquestions writes "Qi: <text>"
        spans.append((offset + head, offset + len(line)))
        offset += len(line) + 1
    enc = tokenizer(prompt + target, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(b > a and any(a < hi and b > lo for lo, hi in spans)) for a, b in enc["offset_mapping"]]
    return Scored(list(enc["input_ids"]), mask)


def scored_pair(tokenizer: PreTrainedTokenizerBase, problem: str, subquestions: Sequence[str], fmt: str) -> Scored:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return (student_scored if fmt == "student" else chat_scored)(tokenizer, problem, subquestions)


@torch.no_grad()
def _padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask, [len(seqs), longest]."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    attn = torch.zeros(ids.shape, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = torch.tensor(seq)
        attn[r, :len(seq)] = 1
    return ids, attn


def token_nll(model: PreTrainedModel, items: Sequence[Scored], *, batch_size: int = 8,
              pad_id: int = 0) -> list[tuple[float, int]]:
    """Per item: (sum of -log p over its scored tokens, number of scored tokens). Eval mode, float32 softmax.

    Token t is predicted by the logits at t - 1, so a scored token at position 0 cannot be scored (the
    builders never put one there).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            ids, attn = _padded([s.input_ids for s in chunk], pad_id)
            score = torch.zeros(ids.shape, dtype=torch.bool)
            for r, s in enumerate(chunk):
                score[r, :len(s.score_mask)] = torch.tensor(s.score_mask, dtype=torch.bool)
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
            logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].to(device)[..., None]).squeeze(-1)
            mask = score[:, 1:].to(device)
            nll = -(logp * mask).sum(1)
            out += [(float(v), int(c)) for v, c in zip(nll.tolist(), mask.sum(1).tolist(), strict=True)]
    finally:
        model.train(was_training)
    return out


def reference_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  pairs: Sequence[tuple[str, Sequence[str]]], fmt: str, *, batch_size: int = 8) -> dict[str, Any]:
    """{"nll_per_token", "tokens", "n"}: mean NLL over all scored tokens of ``(problem, subquestions)``
    pairs (a micro-average: long decompositions weigh more), in nats."""
    items = [scored_pair(tokenizer, p, q, fmt) for p, q in pairs if q]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = token_nll(model, items, batch_size=batch_size, pad_id=pad)
    total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
    return {"nll_per_token": total / count if count else None, "tokens": count, "n": len(items)}


def generation_measures(outputs: Sequence[dict[str, Any]], references: Sequence[Sequence[str] | None]) -> dict[str, Any]:
    """Measures of generated decompositions against references.

    ``outputs``: one dict per problem with ``subquestions`` (parsed, possibly empty) and
    ``finish_reason`` ("stop": the decomposer ended by itself; "length": cut at the token limit;
    anything else, e.g. "error", counts as neither). Returns ROUGE-L / count difference means
    (``evaluation.similarity``), ``parse_rate`` (share with at least one sub-question), ``stop_rate``
    (share that stopped by themselves) and mean ``subquestions`` per problem.
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    sim = aggregate_similarity((o.get("subquestions") or [], r) for o, r in zip(outputs, references, strict=True))
    n = len(outputs)
    return {
        **sim,
        "problems": n,
        "parse_rate": sum(bool(o.get("subquestions")) for o in outputs) / n if n else None,
        "stop_rate": sum(o.get("finish_reason") == "stop" for o in outputs) / n if n else None,
        "subquestions": fmean(len(o.get("subquestions") or []) for o in outputs) if n else None,
    }


@torch.no_grad()
def value_scores(model: PreTrainedModel, heads: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 pairs: Sequence[tuple[str, Sequence[str]]], *, batch_size: int = 8) -> dict[str, list[float]]:
    """ILQL's values of whole decompositions, one per pair, in the student format.

    - ``q_last``: min target Q of the last action (the end marker's last token), given what precedes it:
      with a terminal reward only, the learned estimate of that reward;
    - ``v_last``: V of the state before the last action;
    - ``advantage``: mean over the action tokens of target Q(s, a) - V(s): what guided decoding adds.
    """
    was_training = model.training
    model.eval()
    heads.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eps = [build_episode(tokenizer, p, list(q), usefulness=None, correct=0.0, placement="sparse",
                         max_length=1 << 30) for p, q in pairs]
    out: dict[str, list[float]] = {"q_last": [], "v_last": [], "advantage": []}
    try:
        for i in range(0, len(eps), batch_size):
            chunk = eps[i:i + batch_size]
            ids, attn = _padded([e.input_ids for e in chunk], pad)
            hidden = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                           output_hidden_states=True).hidden_states[-1]
            v = heads.v_head(hidden).squeeze(-1).float()  # [B, T]: V(s) summarised at each position
            for r, e in enumerate(chunk):
                acts = [t for t, a in enumerate(e.action_mask) if a]  # token t is emitted from state t - 1
                states = torch.tensor([t - 1 for t in acts], device=device)
                q = heads.target_q(hidden[r, states]).float()  # [N, vocab]
                q_sa = q.gather(1, ids[r, acts].to(device)[:, None]).squeeze(1)
                v_s = v[r, states]
                out["q_last"].append(float(q_sa[-1]))
                out["v_last"].append(float(v_s[-1]))
                out["advantage"].append(float((q_sa - v_s).mean()))
    finally:
        model.train(was_training)
    return out


def auc(scores: Sequence[float], labels: Sequence[bool]) -> dict[str, Any]:
    """ROC AUC of ``scores`` separating positive from negative labels, with a 95% interval.

    AUC = P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney
    U). The interval is Hanley & McNeil's (1982) normal approximation, clipped to [0, 1]; None when a
    class is empty.
    """
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    n1, n2 = len(pos), len(neg)
    if not n1 or not n2:
        return {"auc": None, "low": None, "high": None, "positives": n1, "negatives": n2}
    # rank-based U statistic: O((n1 + n2) log(n1 + n2)), ties get their average rank
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks are 1-based
        rank_sum += mean_rank * sum(flag for _, flag in ranked[i:j])
        i = j
    a = (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n2)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    half = 1.959964 * math.sqrt(max(var, 0.0))
    return {"auc": a, "low": max(0.0, a - half), "high": min(1.0, a + half), "positives": n1, "negatives": n2}


# --- a decomposer's held-out NLL, for the evaluation report ----------------------------------


def held_out_nll(spec: str, fmt: str, problems: Sequence[dict[str, Any]], *, bf16: bool = False) -> dict[str, Any]:
    """:func:`reference_nll` of ``problems``' human sub-questions under a checkpoint (student format) or a
    base model spec (``fmt="chat"``: the zero-shot decomposer, prompted as the teacher is), on CPU;
    ``bf16``: under bf16 autocast (the weights stay fp32, the log-softmax is taken in fp32)."""
    return decomposer_nll(spec, fmt, [(p["question"], p["reference_subquestions"]) for p in problems
                                      if p.get("reference_subquestions")], bf16=bf16)


def decomposer_nll(spec: str, fmt: str, pairs: Sequence[tuple[str, Sequence[str]]], *,
                   bf16: bool = False) -> dict[str, Any]:
    """:func:`reference_nll` of any ``(problem, sub-questions)`` pairs (human ones, a teacher's...) under a
    checkpoint or model spec, on CPU, as :func:`held_out_nll`."""
    from subq.learner.checkpoint import is_checkpoint, load_checkpoint
    from subq.learner.models import load_model_and_tokenizer

    if is_checkpoint(spec):
        loaded = load_checkpoint(spec)
        model, tok = loaded.model, loaded.tokenizer
    else:
        model, tok = load_model_and_tokenizer(spec)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return reference_nll(model, tok, pairs, fmt)
