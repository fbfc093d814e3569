"""A trained student is usable without subq: final/ carries the training prompt as its chat template,
the end marker as a stop string in generation_config.json and a model card; plain transformers decodes
what `subq serve` decodes, and the server names the student after its run, not "final"."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from subq.learner.checkpoint import (
    default_max_new_tokens,
    load_checkpoint,
    save_checkpoint,
    student_chat_template,
)
from subq.learner.model_card import base_model, build_model_card
from subq.learner.models import load_model_and_tokenizer
from subq.learner.train import TrainConfig, run_train
from subq.protocol.prompts import SUBQ_END, parse_student_output, student_prompt
from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer
from subq.serve.decomposer_model import Decoder, Job
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.ports import free_port
from tests.test_decomposer import SCRIPT, _scripted_model
from tests.test_train import TINY, _store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROBLEMS = ["Tom has 3 apples and buys 2 more. How many apples does he have?",
            "  A train\ttravels 60 km\nin 1 hour.  How far\u00a0in 3 hours? "]
ODD = [*PROBLEMS, "Quotes ' \" and {{ braces }} {% raw %} stay text", "", "\u2003lone\u2003"]


def _transformers_generate(final: Path, problem: str) -> tuple[str, int]:
    """What a user without subq gets from the saved template and generation config (greedy): the text
    before the end marker and the number of tokens generated."""
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, tokenizer=tok)  # everything else from generation_config.json
    new = out[0, inputs["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True).split(SUBQ_END, 1)[0], len(new)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("artifact")
    cfg = TrainConfig(algo="bc", init=TINY, store=_store(root / "store"), out=str(root / "bc"), batch_size=4,
                      max_steps=2, report_every=1, val_fraction=0.25, progress=False, algo_config={"lr": 1e-2})
    return run_train(cfg)


def test_final_prompts_and_decodes_like_subq_serve_without_subq(trained):
    final = Path(trained["final"])
    tok = AutoTokenizer.from_pretrained(final)
    for problem in ODD:  # the template renders exactly the training prompt, whitespace rules included
        for messages in ([{"role": "user", "content": problem}],
                         [{"role": "system", "content": "ignored"}, {"role": "user", "content": "old"},
                          {"role": "assistant", "content": "Q1: x"}, {"role": "user", "content": problem}],
                         [{"role": "user", "content": [{"type": "text", "text": problem}]}]):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
                student_prompt(problem)
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["stop_strings"] == [SUBQ_END] and gen["do_sample"] is False
    assert gen["max_new_tokens"] == default_max_new_tokens(load_checkpoint(final).meta)  # serving's default budget

    cfg = DecomposerConfig(model=str(final), port=free_port(), route_prefix="/artifact", app_name="subq-artifact",
                           num_cpus=0.5, torch_threads=1)
    assert cfg.served_model_name == "bc"  # the run's name, not "final"
    url = start_decomposer(cfg)
    try:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["bc"]
            for problem in PROBLEMS:
                served = client.post("/decompose", json={"problem": problem}).json()
                assert served["model"] == "bc"
                text, n = _transformers_generate(final, problem)
                assert served["raw"] == text and served["subquestions"] == parse_student_output(text)
                assert served["usage"]["completion_tokens"] == n
            chat = client.post("/v1/chat/completions", json={
                "model": "bc", "messages": [{"role": "user", "content": PROBLEMS[0]}]}).json()
            assert chat["model"] == "bc"
    finally:
        stop_decomposer(cfg)

    card = (final / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "license: other" in front and "- bc" in front
    assert "`bc`" in card and TINY in card and "apply_chat_template" in card
    assert f"{trained['episodes']} episodes of 6 problems" in card and "of 2 problems" in card  # 8 problems, 25% held out
    assert "losses/val_bc" in card and "`t` (" in card  # held-out figures, the store's teacher


def test_the_stop_marker_ends_a_plain_transformers_generation_where_serving_stops(tmp_path):
    """A model that writes SCRIPT ("Q1: Why?<end>", then eos): the saved stop string ends generate at the
    marker, as the decomposer does."""
    model, tok = _scripted_model()
    final = save_checkpoint(tmp_path / "run" / "final", model, tok, algo="bc", config={"algo": "bc"},
                            extra={"data": {"max_target_tokens": 100}})
    decoder = Decoder.load(str(final))
    done = decoder.decode([Job(prompt=decoder.prompt_ids(PROBLEMS[0]), max_tokens=125)]).decoded[0]
    text, n = _transformers_generate(final, PROBLEMS[0])
    assert done.text == text == SCRIPT.split(SUBQ_END)[0]
    assert n == done.generated_tokens == len(tok(SCRIPT, add_special_tokens=False)["input_ids"])  # no eos after
    assert DecomposerConfig(model=str(final)).served_model_name == "run"
    assert DecomposerConfig(model=str(final), served_model_name="mine").served_model_name == "mine"
    assert tok.chat_template != student_chat_template()  # the live tokenizer keeps its own template


def test_solver_checkpoints_keep_their_chat_template(tmp_path):
    model, tok = load_model_and_tokenizer(TINY)
    final = save_checkpoint(tmp_path / "final", model, tok, algo="solver-bc", config={"algo": "solver-bc"})
    assert AutoTokenizer.from_pretrained(final).chat_template == tok.chat_template
    assert "stop_strings" not in json.loads((final / "generation_config.json").read_text())


def test_card_base_model_license_and_ilql_note(tmp_path):
    assert base_model("embedded:smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                            "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model("gpt2")[0] == "gpt2"
    model, tok = load_model_and_tokenizer(TINY)
    bc = save_checkpoint(tmp_path / "bc" / "final", model, tok, algo="bc",
                         config={"algo": "bc", "init": "embedded:smollm2-135m-instruct"})
    assert base_model(str(bc))[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # filtered BC / ILQL start from BC
    meta = {"algo": "ilql", "step": 3, "has_heads": True, "prompt_version": "p",
            "config": {"init": str(bc), "store": "s3://user:hunter2@bucket/store", "source": "samples"},
            "extra": {"algo_config": {"beta": 1.0, "api_key": "sk-no"}}}
    card = build_model_card(meta, {"planned_steps": 3, "data": {"episodes": 5}, "metrics": {}}, {}, "ilql")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert "without Q/V guidance" in card and "None measured" in card
    assert "hunter2" not in card and "sk-no" not in card


def test_serve_cli_sets_the_served_name(ray_session, monkeypatch):
    import subq.serve.decomposer as decomposer

    import subq.runtime
    from subq.cli import main

    served: list[DecomposerConfig] = []
    monkeypatch.setattr(subq.runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(decomposer, "run_decomposer_forever", served.append)  # no Ray: the config is the point
    assert main(["serve", "--model", TINY, "--served-model-name", "mine"]) == 0
    assert main(["serve", "--model", TINY]) == 0
    assert [c.served_model_name for c in served] == ["mine", "tiny-random-llama"]
