"""Solver distillation: the baseline of "Divide-or-Conquer?" (Wu et al. 2024) that distils the *solver*.

Paper 2 compares distilling the decomposer (what the rest of subq does) with distilling the solver:
the student reads a problem and its sub-questions and learns to answer them in order and give the
final answer, from the teacher's stored answers. Two targets (``protocol.solve_prompts.solver_reply``):

- ``target="teacher"`` (SE-T): the teacher's sub-answers, then "Final answer: <the teacher's final answer>";
- ``target="gold"`` (SE-A): the teacher's sub-answers, then "Final answer: <the gold value>".

Only samples whose answer stage succeeded give an episode, with one stored answer per sub-question
(and, for "gold", a gold value). ``correct_only`` keeps the samples whose teacher answer was right.

Format. The student is later served as a solver by ``subq llm-server`` (``serve/llm_server.py``),
which renders the evaluation's ``protocol.solve_prompts.solve_messages(problem, subquestions, "number")``
with the model's chat template (``add_generation_prompt=True``) and tokenises it without adding
special tokens. The episode's context is exactly that, its actions the reply and the tokenizer's
eos (the end of an assistant turn, where the server stops decoding): the student answers the
evaluation's prompt in the trained format. The update is BC's (:class:`learner.bc.BC`), unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from subq.learner.bc import BCConfig
from subq.learner.episodes import Episode
from subq.protocol.answers import format_number
from subq.protocol.solve_prompts import SOLVER_ANSWER_TYPE, SOLVER_TARGETS, solve_messages, solver_reply
from transformers import PreTrainedTokenizerBase


@dataclass
class SolverBCConfig(BCConfig):
    target: str = "teacher"  # "teacher" (SE-T): the teacher's final answer; "gold" (SE-A): the gold value
    correct_only: bool = False  # only samples whose teacher answer was correct (paper 2's screening)


def check_config(cfg: SolverBCConfig) -> None:
    if cfg.target not in SOLVER_TARGETS:
        raise ValueError(f"target must be one of {SOLVER_TARGETS}, got {cfg.target!r}")


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """The solver is served through the chat API: its tokenizer needs a chat template and an eos."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("solver-bc needs a model whose tokenizer has a chat template (the solver is served "
                         "through /v1/chat/completions, which renders the solve prompt with it)")
    if tokenizer.eos_token_id is None:
        raise ValueError("solver-bc needs a tokenizer with an eos token (it ends the solver's reply)")


def solve_prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: str, subquestions: list[str]) -> list[int]:
    """The evaluation's solve prompt as ``subq llm-server`` feeds it to the model: the chat template's
    rendering with the generation prompt, tokenised without adding special tokens a second time."""
    text = tokenizer.apply_chat_template(solve_messages(problem, subquestions, SOLVER_ANSWER_TYPE),
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _texts(value: Any) -> list[str]:
    return [] if _missing(value) else [str(v) for v in value]


def solver_target(row: dict[str, Any], target: str) -> tuple[str | None, str | None]:
    """A ``samples`` row's training reply for ``target``, or (None, the reason it has none)."""
    status = row.get("answer_status")
    if status != "ok":
        return None, f"answer_{status or 'missing'}"
    subqs, answers = _texts(row.get("subquestions")), _texts(row.get("subanswers"))
    if not subqs or any(not q.strip() for q in subqs):
        return None, "no_subquestions"
    if not answers or any(not a.strip() for a in answers):
        return None, "no_subanswers"
    if len(answers) != len(subqs):
        return None, "subanswer_count"  # the solver must answer every sub-question, one line each
    if target == "gold":
        gold = row.get("gold_value")
        if _missing(gold) or not math.isfinite(float(gold)):
            return None, "no_gold"
        final = format_number(float(gold))
    else:
        final = "" if _missing(row.get("final_answer")) else str(row["final_answer"]).strip()
        if not final:
            return None, "no_final_answer"
    return solver_reply(answers, final), None


def solver_episode_from_sample(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, target: str = "teacher",
                               max_length: int = 512) -> tuple[Episode | None, str | None]:
    """One ``samples`` row as a solver episode (context: the solve prompt; actions: the reply + eos), or
    (None, why not): the reasons of :func:`solver_target`, or "too_long" (the prompt is never cut: the
    evaluation sends it whole)."""
    if target not in SOLVER_TARGETS:
        raise ValueError(f"target must be one of {SOLVER_TARGETS}, got {target!r}")
    reply, reason = solver_target(row, target)
    if reply is None:
        return None, reason
    context = solve_prompt_ids(tokenizer, str(row["question"]), _texts(row.get("subquestions")))
    actions = list(tokenizer(reply, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    n = len(context) + len(actions)
    if n > max_length or not context:
        return None, "too_long"
    correct = row.get("correct")
    usefulness = row.get("usefulness")
    use = [] if _missing(usefulness) or any(_missing(u) for u in usefulness) else [float(u) for u in usefulness]
    return Episode(
        input_ids=context + actions, action_mask=[0] * len(context) + [1] * len(actions),
        rewards=[0.0] * n, dones=[0] * (n - 1) + [1], subq_end_positions=[],
        correct=0.0 if _missing(correct) else float(bool(correct)), usefulness=use,
        sample_key=row.get("sample_key"), problem_id=row.get("problem_id"),
    ), None
