"""Solver distillation (learner/solver_bc.py, paper 2's SE-T / SE-A): the episodes (context = the
evaluation's solve prompt as the LLM server renders it, loss on the reply only, teacher vs gold
targets, exclusions), the data step, and a student trained through the Ray Train driver that, served
by the OpenAI-compatible LLM server, answers the evaluation's solve prompt in the trained format."""

from __future__ import annotations

from datetime import datetime, timezone

import openai
import pytest
from subq.data_store.schema import sample_key
from subq.data_store.store import Store
from subq.learner.batches import EpisodeTable
from subq.learner.checkpoint import load_checkpoint
from subq.learner.data import DATA_DIR, prepare_data
from subq.learner.models import load_tokenizer
from subq.learner.solver_bc import solver_episode_from_sample
from subq.learner.train import TrainConfig, check_config, run_train
from subq.protocol.answers import format_number
from subq.protocol.solve_prompts import SOLVE_PROMPT_VERSION, solve_messages

from subq.cli import main
from tests.ports import free_port

TINY = "tiny-random:llama?layers=1&hidden=32&seed=0"
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
SUBQS = ["How many apples does Tom buy?", "How many apples does Tom have now?"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _row(i: int = 0, **kw) -> dict:
    now = datetime.now(timezone.utc)
    base = dict(sample_key=sample_key(f"p{i}", "t", "v", 0), problem_id=f"p{i}", teacher_model="t",
                prompt_version="v", sample_index=0, source="collect", question=QUESTION, gold_value=8.0,
                subquestions=SUBQS, subanswers=["Tom buys 5 apples.", "He has 3 + 5 =\n 8 apples."],
                final_answer="8", final_value=8.0, correct=True, usefulness=[1.0, 1.0], status="ok",
                answer_status="ok", created_at=now, updated_at=now)
    return {**base, **kw}


def _served_prompt_ids(tok, messages) -> list[int]:
    """What serve/llm_server.py feeds the model for a chat request (its _prompt_ids)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------- episodes


def test_context_is_the_served_solve_prompt_and_only_the_reply_carries_loss():
    tok = load_tokenizer(TINY)
    ep, reason = solver_episode_from_sample(_row(), tok, target="teacher", max_length=1024)
    assert reason is None
    n_ctx = ep.action_mask.index(1)
    assert ep.input_ids[:n_ctx] == _served_prompt_ids(tok, solve_messages(QUESTION, SUBQS, "number"))
    assert ep.action_mask == [0] * n_ctx + [1] * (len(ep.input_ids) - n_ctx)
    assert ep.input_ids[-1] == tok.eos_token_id and ep.dones[-1] == 1 and sum(ep.dones) == 1
    # one line per answer (a stored line break becomes a space), then the teacher's final answer
    assert tok.decode(ep.input_ids[n_ctx:-1]) == (
        "A1: Tom buys 5 apples.\nA2: He has 3 + 5 = 8 apples.\nFinal answer: 8")
    assert (ep.correct, ep.problem_id, ep.sample_key) == (1.0, "p0", _row()["sample_key"])


def test_teacher_and_gold_targets_differ_only_in_the_final_answer():
    tok = load_tokenizer(TINY)
    wrong = _row(final_answer="9 apples", final_value=9.0, correct=False, gold_value=8.0)
    teacher, _ = solver_episode_from_sample(wrong, tok, target="teacher", max_length=1024)
    gold, _ = solver_episode_from_sample(wrong, tok, target="gold", max_length=1024)
    n_ctx = teacher.action_mask.index(1)
    assert teacher.input_ids[:n_ctx] == gold.input_ids[:n_ctx]
    assert tok.decode(teacher.input_ids[n_ctx:-1]).endswith("\nFinal answer: 9 apples")  # SE-T
    assert tok.decode(gold.input_ids[n_ctx:-1]).endswith("\nFinal answer: 8")  # SE-A
    assert tok.decode(gold.input_ids[n_ctx:-1]).startswith("A1: Tom buys 5 apples.\nA2: He has 3 + 5 = 8 apples.")
    assert [format_number(v) for v in (72.0, 0.5, -3.25, 1e6)] == ["72", "0.5", "-3.25", "1000000"]


@pytest.mark.parametrize(("change", "target", "reason"), [
    ({"answer_status": "parse_error"}, "teacher", "answer_parse_error"),
    ({"answer_status": None}, "teacher", "answer_missing"),
    ({"subanswers": None}, "teacher", "no_subanswers"),
    ({"subanswers": ["Tom buys 5 apples.", " "]}, "teacher", "no_subanswers"),
    ({"subanswers": ["Tom buys 5 apples."]}, "teacher", "subanswer_count"),
    ({"subquestions": []}, "teacher", "no_subquestions"),
    ({"final_answer": None}, "teacher", "no_final_answer"),
    ({"gold_value": None}, "gold", "no_gold"),
    ({"gold_value": float("nan")}, "gold", "no_gold"),
])
def test_samples_without_usable_answers_give_no_episode_and_say_why(change, target, reason):
    tok = load_tokenizer(TINY)
    assert solver_episode_from_sample(_row(**change), tok, target=target, max_length=1024) == (None, reason)


def test_a_prompt_that_does_not_fit_is_dropped_never_cut():
    tok = load_tokenizer(TINY)
    ep, _ = solver_episode_from_sample(_row(), tok, max_length=1024)
    assert solver_episode_from_sample(_row(), tok, max_length=len(ep.input_ids) - 1) == (None, "too_long")
    assert solver_episode_from_sample(_row(), tok, max_length=len(ep.input_ids))[0] == ep


# ------------------------------------------------------------------------------------ data step


def test_data_step_builds_the_chosen_target_and_records_it(ray_session, tmp_path):
    rows = [_row(i, question=f"Tom has {i} apples and buys 5 more. How many apples does he have?",
                 correct=bool(i % 2), final_answer=str(i + 5 + (1 - i % 2)), gold_value=float(i + 5))
            for i in range(6)]
    rows += [_row(6, answer_status="api_error"), _row(7, subanswers=["only one"])]
    store = str(tmp_path / "store")
    Store(store).append("samples", rows)
    cfg = TrainConfig(algo="solver-bc", init=TINY, store=store, out=str(tmp_path / "gold"), max_length=1024,
                      val_fraction=0.0, algo_config={"target": "gold"}, progress=False)
    manifest = prepare_data(cfg, TINY, tmp_path / "gold")
    stats = manifest["stats"]
    assert stats["excluded"] == {"answer_api_error": 1, "subanswer_count": 1} and stats["episodes"] == 6
    assert (stats["solver_target"], stats["solve_prompt_version"]) == ("gold", SOLVE_PROMPT_VERSION)
    assert manifest["build"]["selection"]["target"] == "gold"
    tok = load_tokenizer(TINY)
    data = EpisodeTable(tmp_path / "gold" / DATA_DIR)
    finals = sorted(tok.decode(ep.input_ids).rsplit("Final answer: ", 1)[1] for ep in data.episodes(data.train_rows))
    assert finals == sorted(f"{i + 5}<|im_end|>" for i in range(6))  # the gold values, not the teacher's
    # correct_only keeps the samples whose teacher answer was right (paper 2's screening)
    screened = prepare_data(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "t"),
                                           "algo_config": {"correct_only": True}}), TINY, tmp_path / "t")
    assert screened["stats"]["episodes"] == 3 and screened["stats"]["filtered_out"] == 3
    assert screened["fingerprint"] != manifest["fingerprint"]


def test_config_and_command_line_errors_fail_before_work(tmp_path, capsys):
    base = dict(algo="solver-bc", init=TINY, store=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="target must be one of"):
        check_config(TrainConfig(**base, algo_config={"target": "oracle"}))
    with pytest.raises(ValueError, match="source must be 'samples'"):
        check_config(TrainConfig(**base, source="reference"))
    assert main(["train", "--algo", "bc", "--target", "gold", "--store", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "--target is for --algo solver-bc" in capsys.readouterr().err
    assert main(["train", "--algo", "solver-bc", "--set", "target=oracle", "--store", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "target must be one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------- trained, then served as a solver


def test_a_trained_solver_served_by_the_llm_server_answers_the_solve_prompt_in_the_trained_format(
        ray_session, tmp_path):
    """SE-A through the driver on one sample whose teacher answer was wrong (9, gold 8), until the tiny
    model has learnt it; then `subq llm-server --model OUT/final`'s deployment, asked with the
    evaluation's solve prompt over HTTP, replies with the teacher's answers and the gold final answer."""
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    store = str(tmp_path / "store")
    Store(store).append("samples", [_row(final_answer="9", final_value=9.0, correct=False)])
    cfg = TrainConfig(algo="solver-bc", init=TINY, store=store, out=str(tmp_path / "se"), batch_size=1,
                      max_steps=150, epochs=150, max_length=1024, val_fraction=0.0, report_every=50,
                      checkpoint_every=150, algo_config={"target": "gold", "lr": 1e-2}, progress=False)
    summary = run_train(cfg)
    assert summary["step"] == 150 and summary["metrics"]["charts/token_accuracy"] == 1.0
    meta = load_checkpoint(summary["final"]).meta
    assert meta["algo"] == "solver-bc" and meta["extra"]["data"]["solver_target"] == "gold"
    server = LLMServerConfig(model=summary["final"], port=free_port(), route_prefix="/se", app_name="subq-se-test",
                             max_new_tokens=128)
    base_url = start_llm_server(server)
    try:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=server.served_model_name, temperature=0, max_tokens=128,
                                               messages=solve_messages(QUESTION, SUBQS, "number"))
    finally:
        stop_llm_server(server)
    choice = reply.choices[0]
    assert choice.message.content == "A1: Tom buys 5 apples.\nA2: He has 3 + 5 = 8 apples.\nFinal answer: 8"
    assert choice.finish_reason == "stop"  # it ended its turn with eos, as trained
