"""Continuous batching without Ray: serve.sampling, serve.generation.BatchDecoder and serve.engine.

Rows that join a running batch (their caches merged into it) decode exactly what they decode alone;
a row whose scores break fails alone; streamed text adds up to the final text; a cancelled request
leaves the batch; the engine thread admits a short request while a long one runs.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from subq.learner.ilql import ILQLHeads
from subq.learner.models import load_model_and_tokenizer
from subq.serve.engine import Engine, RequestError, RequestStream
from subq.serve.generation import BatchDecoder, Delta, Failed, Finished, Request, generate
from subq.serve.sampling import MIN_TEMPERATURE, RowState, SamplingParams, choose_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module", params=["tiny-random:llama", "tiny-random:gpt2"])
def tiny(request):
    return load_model_and_tokenizer(request.param)


def _ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]


class Sink:
    """Collects a request's events, as the engine's receivers do."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def finished(self) -> list:
        return [e.completion for e in sorted((e for e in self.events if isinstance(e, Finished)), key=lambda e: e.index)]

    @property
    def failed(self) -> list[Failed]:
        return [e for e in self.events if isinstance(e, Failed)]


def test_rows_that_join_a_running_batch_decode_as_they_would_alone(tiny):
    model, tok = tiny
    prompts = [_ids(tok, "hi"), _ids(tok, "a much longer question " * 6), _ids(tok, "?"), _ids(tok, "mid " * 3)]
    alone = [generate(model, tok, [p], [GREEDY]).completions[0][0] for p in prompts]
    decoder = BatchDecoder(model, tok)
    sinks = [Sink() for _ in prompts]
    decoder.admit([Request(prompts[0], GREEDY, sinks[0])])
    for _ in range(3):
        decoder.step()
    decoder.admit([Request(prompts[1], GREEDY, sinks[1])])  # longer than the running cache: it is padded
    decoder.step()
    decoder.admit([Request(p, GREEDY, s) for p, s in zip(prompts[2:], sinks[2:], strict=True)])  # shorter ones
    while decoder.rows:
        decoder.step()
    for sink, ref in zip(sinks, alone, strict=True):
        assert not sink.failed
        got = sink.finished[0]
        assert (got.token_ids, got.finish_reason, got.generated_tokens) == (ref.token_ids, ref.finish_reason,
                                                                           ref.generated_tokens)
    assert decoder._cache is None and decoder._mask.shape == (0, 0)  # everything left the batch


def test_a_row_with_broken_scores_fails_alone(tiny):
    """NaN logits for one row (a model hook poisons rows that see a marker token) end that request with
    a 500-class failure, at prefill and mid-decoding; its batch-mates finish as they would alone."""
    model, tok = tiny
    marker = tok.convert_tokens_to_ids("~")  # a byte no prompt below contains

    def poison(module, args, kwargs, output):
        hit = (kwargs["input_ids"] == marker).any(dim=1)
        output.logits[hit] = math.nan
        return output

    normal = _ids(tok, "hello there")
    ref = generate(model, tok, [normal], [GREEDY]).completions[0][0]
    handle = model.register_forward_hook(poison, with_kwargs=True)
    try:
        decoder = BatchDecoder(model, tok)
        at_prefill, mid_decode, ok, tiny_t = Sink(), Sink(), Sink(), Sink()
        decoder.admit([
            Request(_ids(tok, "poison ~"), GREEDY, at_prefill),
            # forced to write the marker first, so its second step sees it
            Request(_ids(tok, "later"), SamplingParams(max_tokens=24, temperature=0, logit_bias=((marker, 100.0),)),
                    mid_decode),
            Request(normal, GREEDY, ok),
            # temperature 1e-40 overflowed logits / T to inf and failed the whole batch before the fix
            Request(normal, SamplingParams(max_tokens=24, temperature=1e-40), tiny_t),
        ])
        while decoder.rows:
            decoder.step()
    finally:
        handle.remove()
    assert at_prefill.failed and "non-finite" in at_prefill.failed[0].message and not at_prefill.finished
    assert at_prefill.failed[0].status == 500
    assert mid_decode.failed and not mid_decode.finished
    assert ok.finished[0].token_ids == ref.token_ids and not ok.failed
    assert tiny_t.finished[0].token_ids == ref.token_ids  # below MIN_TEMPERATURE: greedy


def test_streamed_deltas_add_up_to_the_final_text_and_hold_back_stop_prefixes(tiny):
    model, tok = tiny
    prompt = _ids(tok, "tell me")
    free = generate(model, tok, [prompt], [SamplingParams(max_tokens=40, temperature=0)]).completions[0][0]
    visible = [ch for ch in free.text[5:] if ch != "\ufffd" and not ch.isspace()]
    stop = visible[0] + "zz" if visible else "zz"  # starts like the text, never completes: held back, then sent
    for params in (SamplingParams(max_tokens=40, temperature=0, stop=(stop,)),
                   SamplingParams(max_tokens=40, temperature=0.9, seed=4, n=2, stop=(free.text[6:8] or "zz",))):
        sink = Sink()
        decoder = BatchDecoder(model, tok)
        decoder.admit([Request(prompt, params, sink, stream=True)])
        while decoder.rows:
            decoder.step()
        for k, completion in enumerate(sink.finished):
            streamed = "".join(e.text for e in sink.events if isinstance(e, Delta) and e.index == k)
            assert streamed == completion.text
            # a Finished event comes after all of its sample's deltas
            last_delta = max(i for i, e in enumerate(sink.events) if isinstance(e, Delta) and e.index == k) \
                if streamed else -1
            assert last_delta < next(i for i, e in enumerate(sink.events) if isinstance(e, Finished) and e.index == k)
    plain = Sink()
    decoder = BatchDecoder(model, tok)
    decoder.admit([Request(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)), plain)])
    while decoder.rows:
        decoder.step()
    assert not any(isinstance(e, Delta) for e in plain.events)  # not streaming: only the result


def test_a_cancelled_request_leaves_the_batch(tiny):
    model, tok = tiny
    long = SamplingParams(max_tokens=200, temperature=0, logit_bias=((tok.eos_token_id, -100.0),))
    decoder = BatchDecoder(model, tok)
    gone, stays = Sink(), Sink()
    doomed = Request(_ids(tok, "a"), long, gone)
    decoder.admit([doomed, Request(_ids(tok, "b"), SamplingParams(max_tokens=30, temperature=0), stays)])
    decoder.step()
    doomed.cancelled = True
    decoder.step()
    assert len(decoder.rows) == 1 and decoder.rows[0].request is not doomed
    while decoder.rows:
        decoder.step()
    assert not gone.finished and not gone.failed and stays.finished
    assert decoder.forward_passes < 40  # the 200-token row did not keep the batch going


def test_guided_rows_join_and_match_plain_rows(tiny):
    """With ILQL heads, beta-0 rows decode the plain LM exactly, and guided rows admitted together or
    apart decode the same tokens."""
    model, tok = tiny
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model).eval()
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    prompts = [_ids(tok, "x"), _ids(tok, "a longer problem here")]
    guided = SamplingParams(max_tokens=16, temperature=0, beta=2.0)
    plain_ref = generate(model, tok, [prompts[0]], [GREEDY]).completions[0][0]
    together = generate(model, tok, prompts, [GREEDY, guided], heads=heads).completions
    apart = generate(model, tok, [prompts[1]], [guided], heads=heads).completions[0][0]
    assert together[0][0].token_ids == plain_ref.token_ids
    assert together[1][0].token_ids == apart.token_ids
    assert apart.token_ids != generate(model, tok, [prompts[1]], [replace_beta(guided, 0.0)]).completions[0][0].token_ids


def replace_beta(params: SamplingParams, beta: float) -> SamplingParams:
    from dataclasses import replace

    return replace(params, beta=beta)


def test_choose_tokens_per_row_settings_and_guards():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 6)
    logits[4, 1] = math.nan
    rows = [
        RowState(SamplingParams(temperature=0), None),  # greedy: 3
        RowState(SamplingParams(temperature=MIN_TEMPERATURE / 10), None),  # tiny temperature: greedy
        RowState(SamplingParams(temperature=0, logit_bias=((0, 10.0),)), None),  # bias wins: 0
        RowState(SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=0.5),
                 None, counts=torch.tensor([0.0, 0.0, 0.0, 1.0])),  # 3 - 2 - 0.5 = 0.5 < 2: token 2
        RowState(SamplingParams(temperature=0), None),  # NaN: fails alone
        RowState(SamplingParams(temperature=1.0, top_p=0.01, seed=1), torch.Generator().manual_seed(1)),  # nucleus of 1
    ]
    tokens, errors = choose_tokens(logits, rows)
    assert tokens[:4] == [3, 3, 0, 2] and tokens[5] == 3
    assert errors[4] is not None and [e for i, e in enumerate(errors) if i != 4] == [None] * 5
    huge = torch.tensor([[3e38, 0.0, -3e38]])  # scores / 0.5 overflow: fall back to argmax, not NaN
    assert choose_tokens(huge, [RowState(SamplingParams(temperature=0.5), None)]) == ([0], [None])
    excluded = torch.full((1, 4), -math.inf)
    assert choose_tokens(excluded, [RowState(SamplingParams(temperature=1.0), None)])[1][0] is not None


def test_engine_admits_a_short_request_while_a_long_one_runs(tiny):
    """The engine thread: a short request sent after a long one finishes first (it joined the running
    batch), a failed request raises RequestError, a stream that is closed early cancels its rows."""
    model, tok = tiny
    engine = Engine(BatchDecoder(model, tok), max_rows=4, wait_s=0.0)
    long = SamplingParams(max_tokens=400, temperature=0, logit_bias=((tok.eos_token_id, -100.0),))

    async def scenario() -> None:
        order: list[str] = []

        async def run(name: str, prompt: list[int], params: SamplingParams) -> None:
            await RequestStream(engine, prompt, params).result()
            order.append(name)

        first = asyncio.create_task(run("long", _ids(tok, "long"), long))
        while engine.stats["running_rows"] == 0:
            await asyncio.sleep(0.01)
        await run("short", _ids(tok, "short"), SamplingParams(max_tokens=2, temperature=0))
        await first
        assert order == ["short", "long"] and engine.stats["max_batch_requests"] >= 2
        with pytest.raises(RequestError) as info:
            await RequestStream(engine, [1] * 5000, GREEDY).result()  # longer than the context
        assert info.value.status == 400 and engine.stats["failed_requests"] == 1
        stream = RequestStream(engine, _ids(tok, "streamed"), long, stream=True)
        events = stream.events()
        assert isinstance(await anext(events), Delta | Finished)
        await events.aclose()  # what a disconnecting client's response does
        while engine.stats["running_rows"]:
            await asyncio.sleep(0.01)
        assert stream.request.cancelled and engine.stats["cancelled_requests"] == 1

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
