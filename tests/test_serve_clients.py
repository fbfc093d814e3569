"""The ecosystem's own clients against subq's two servers (issue 21 B), on tiny random models.

- ``POST /v1/completions`` of the LLM server over HTTP: echo + logprobs (the prompt's own log-probs,
  the first ``null``), generation with log-probs, several prompts, token-id prompts, streaming;
- chat ``logprobs`` in OpenAI's chat shape;
- ``langchain-openai``'s ``ChatOpenAI`` (``invoke`` and ``stream``, messages with ``name``) against both;
- ``lm-evaluation-harness``: ``local-completions`` log-likelihood on a 3-doc multiple-choice task
  (a YAML written here; no downloads) and ``local-chat-completions`` generate_until;
- ``subq eval --decomposer NAME=openai:MODEL@URL`` against subq's own LLM server (it needs
  ``/v1/completions``, which answered 404 before).
"""

from __future__ import annotations

import json
import os
import textwrap

import httpx
import openai
import pytest
import torch
from subq.learner.models import load_model_and_tokenizer, resolve_model_path
from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer
from subq.serve.generation import SamplingParams, generate
from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server
from subq.serve.logprobs import score_tokens

from tests.ports import free_port

MODEL = "tiny-random:llama?layers=2&hidden=32&heads=2&ctx=1024&seed=5"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster


@pytest.fixture(scope="module")
def llm(ray_session):
    cfg = LLMServerConfig(model=MODEL, port=free_port(), route_prefix="/clients", app_name="subq-test-clients",
                          max_batch_size=8, batch_wait_timeout_s=0.05, max_new_tokens=64, num_cpus=0.5,
                          torch_threads=1)
    url = start_llm_server(cfg)
    yield cfg, url
    stop_llm_server(cfg)


@pytest.fixture(scope="module")
def decomposer(ray_session):
    cfg = DecomposerConfig(model=MODEL, port=free_port(), route_prefix="/clients-dec", app_name="subq-test-clients-dec",
                           max_batch_size=4, batch_wait_timeout_s=0.05, max_new_tokens=24, num_cpus=0.5,
                           torch_threads=1)
    url = start_decomposer(cfg)
    yield cfg, url
    stop_decomposer(cfg)


@pytest.fixture(scope="module")
def local():
    return load_model_and_tokenizer(MODEL)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------ /v1/completions


def test_echo_with_max_tokens_0_returns_the_prompts_own_logprobs(llm, local):
    """What lm-evaluation-harness's log-likelihood needs: every prompt token scored, the first null."""
    cfg, url = llm
    model, tok = local
    prompt = "Natalia sold 48 clips."
    reply = _client(url).completions.create(model=cfg.served_model_name, prompt=prompt, max_tokens=0, echo=True,
                                            logprobs=2, temperature=0)
    [choice] = reply.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    want = score_tokens(model, ids, 0, top_k=2)
    assert "".join(lp.tokens) == prompt and lp.text_offset == list(range(len(prompt)))  # one byte, one token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-4)
    for t in range(1, len(ids)):
        assert tok.decode([ids[t]]) in lp.top_logprobs[t] and 2 <= len(lp.top_logprobs[t]) <= 3
        assert max(lp.top_logprobs[t].values()) == pytest.approx(want.top[t][0][1], abs=1e-4)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0


def test_generation_with_logprobs_several_prompts_and_token_ids(llm, local):
    cfg, url = llm
    model, tok = local
    client = _client(url)
    reply = client.completions.create(model=cfg.served_model_name, prompt=["Q1: How", "Tom has 3"], max_tokens=6,
                                      temperature=0, n=2, logprobs=1)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]  # prompt by prompt, n each
    assert reply.choices[0].text == reply.choices[1].text and reply.choices[2].text == reply.choices[3].text
    for c, prompt in zip(reply.choices, ["Q1: How", "Q1: How", "Tom has 3", "Tom has 3"], strict=True):
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text and lp.text_offset[0] == len(prompt)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        [[alone]] = generate(model, tok, [ids], [SamplingParams(max_tokens=6, temperature=0)]).completions
        assert c.text == alone.text  # (the text has lone bytes: re-tokenizing it would not give its tokens)
        want = score_tokens(model, ids + alone.token_ids, len(ids), top_k=1)
        assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
        # greedy: each token is (up to rounding) the most likely one
        assert all(t >= max(top.values()) - 1e-4 for t, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True))
    assert reply.usage.prompt_tokens == len("Q1: How") + len("Tom has 3")  # each prompt once
    ids = tok("Tom has 3", add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(model=cfg.served_model_name, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == reply.choices[2].text


def test_streamed_completion_equals_the_plain_one_and_bad_requests_are_400(llm):
    cfg, url = llm
    client = _client(url)
    plain = client.completions.create(model=cfg.served_model_name, prompt="Tom has 3", max_tokens=8, temperature=0,
                                      echo=True)
    chunks = list(client.completions.create(model=cfg.served_model_name, prompt="Tom has 3", max_tokens=8,
                                            temperature=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    for extra, param in (({"best_of": 3}, "best_of"), ({"logprobs": 1, "stream": True}, "logprobs"),
                         ({"prompt": [999999]}, "prompt"), ({"suffix": "x"}, "suffix")):
        body = {"model": cfg.served_model_name, "prompt": "x", "max_tokens": 1, **extra}
        r = httpx.post(f"{url}/completions", json=body, timeout=60, trust_env=False)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_chat_logprobs_in_openais_chat_shape(llm):
    cfg, url = llm
    reply = _client(url).chat.completions.create(model=cfg.served_model_name, max_tokens=5, temperature=0,
                                                 messages=[{"role": "user", "content": "Hi", "name": "alice"}],
                                                 logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob >= t.top_logprobs[0].logprob - 1e-4 for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)


def test_null_message_keys_and_names_on_both_servers(llm, decomposer):
    """A replayed assistant message as the openai client serialises it, with name on a user message."""
    messages = [{"role": "user", "content": "Split: Tom has 3 apples.", "name": "alice"},
                {"role": "assistant", "content": "Q1: ?", "refusal": None, "tool_calls": None, "audio": None},
                {"role": "user", "content": "Tom has 3 apples and buys 2. How many?", "name": "alice"}]
    for url in (llm[1], f"{decomposer[1]}/v1"):
        r = httpx.post(f"{url}/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=120,
                       trust_env=False)
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ langchain-openai


def test_langchain_chat_openai_invoke_and_stream_on_both_servers(llm, decomposer):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    messages = [SystemMessage("Be brief."), HumanMessage("Hi", name="alice"), AIMessage("Hello"),
                HumanMessage("Tom has 3 apples and buys 2. How many apples?", name="alice")]
    for model, url in ((llm[0].served_model_name, llm[1]), (decomposer[0].served_model_name, f"{decomposer[1]}/v1")):
        chat = ChatOpenAI(model=model, base_url=url, api_key="unused", temperature=0, max_tokens=8, max_retries=0,
                          timeout=120)
        whole = chat.invoke(messages)
        assert isinstance(whole.content, str) and whole.response_metadata["finish_reason"] in ("stop", "length")
        streamed = "".join(str(c.content) for c in chat.stream(messages))
        assert streamed == whole.content


# ------------------------------------------------------------------------------ lm-evaluation-harness


MC_DOCS = [{"question": "2 + 2 =", "choices": ["4", "5"], "label": 0},  # the harness puts " " before a choice
           {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
           {"question": "Tom has 3 apples and buys 2, so he has", "choices": ["5", "6"], "label": 0}]
GEN_DOCS = [{"question": "Say yes.", "answer": "yes"}, {"question": "Say no.", "answer": "no"}]


def _tasks(root) -> None:
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    (root / "subq_mc.yaml").write_text(textwrap.dedent(f"""\
        task: subq_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    (root / "subq_gen.yaml").write_text(textwrap.dedent(f"""\
        task: subq_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 6
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
        """))


def test_lm_eval_loglikelihood_and_generation_through_the_llm_server(llm, local, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg, url = llm
    model, tok = local
    _tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["subq_mc"], task_manager=manager, log_samples=True,
        model_args={"model": cfg.served_model_name, "base_url": f"{url}/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": resolve_model_path(MODEL), "num_concurrent": 1, "max_retries": 1,
                    "max_length": 1024})
    assert 0.0 <= out["results"]["subq_mc"]["acc,none"] <= 1.0
    samples = out["samples"]["subq_mc"]
    assert len(samples) == len(MC_DOCS)
    for s in samples:  # the harness's log-likelihoods are the model's own
        doc = s["doc"]
        for (ll, _greedy), choice in zip(s["filtered_resps"], doc["choices"], strict=True):
            ctx = tok(doc["question"], add_special_tokens=False)["input_ids"]
            ids = ctx + tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                want = sum(score_tokens(model, ids, len(ctx), top_k=0).logprobs)
            assert ll == pytest.approx(want, abs=1e-3)

    out = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["subq_gen"], task_manager=manager, apply_chat_template=True,
        log_samples=True,
        model_args={"model": cfg.served_model_name, "base_url": f"{url}/chat/completions", "num_concurrent": 1,
                    "max_retries": 1})
    assert 0.0 <= out["results"]["subq_gen"]["exact_match,none"] <= 1.0
    assert len(out["samples"]["subq_gen"]) == len(GEN_DOCS)
    assert all(isinstance(s["filtered_resps"][0], str) for s in out["samples"]["subq_gen"])


# ------------------------------------------------------------------------------ subq eval


def test_subq_eval_with_an_openai_decomposer_on_subqs_own_llm_server(llm, local, tmp_path):
    from subq.actors.prices import PriceTable
    from subq.data_store.datasets import load_problems
    from subq.evaluation.clients import DecomposerSpec, SolverSpec
    from subq.evaluation.plan import run_keys
    from subq.evaluation.records import read_records
    from subq.evaluation.run import EvalConfig, run_eval
    from subq.protocol.prompts import student_prompt

    from tests.teacher_server import TeacherServer

    cfg, url = llm
    _, tok = local
    bench = "gsm8k:test[:2]"
    with TeacherServer(model="solver") as solver:
        dec = DecomposerSpec("openai", "student", url=url, model=cfg.served_model_name)
        sv = SolverSpec(base_url=solver.base_url, model="solver")
        ecfg = EvalConfig(benchmarks=[bench], out_dir=str(tmp_path / "eval"), decompose_max_tokens=12, batch_size=2,
                          max_actors=1, progress=False)
        [summary] = run_eval(ecfg, [dec], [sv], PriceTable().with_price(cfg.served_model_name, 0.0, 0.0))
    [key] = run_keys(ecfg, "student", dec.identity, [sv])
    records = read_records(key.path(ecfg.out_dir, bench))
    problems = {p["problem_id"]: p for p in load_problems(bench)}
    assert summary.n == 2 and len(records) == 2
    for rec in records:  # answered by /v1/completions (it was a 404): usage as the server counted it
        assert not str(rec.get("decompose_error") or "").startswith("api_error"), rec["decompose_error"]
        prompt = student_prompt(problems[rec["problem_id"]]["question"])
        assert rec["decompose_tokens_in"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert 1 <= rec["decompose_tokens_out"] <= 12


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's datasets must never reach for the hub
