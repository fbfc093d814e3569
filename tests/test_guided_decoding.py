"""Guided decoding: the KV cache changes speed, never tokens; beta = 0 is the LM's own greedy decoding."""

from __future__ import annotations

import pytest
import torch
from subq.learner.guided_decoding import generate_guided
from subq.learner.ilql import ILQLHeads, guided_logits
from subq.learner.models import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster
PROMPTS = ["Problem: 3 apples", "Hi", "A much longer prompt, left padded less"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    model, tok = load_model_and_tokenizer(f"tiny-random:{request.param}?hidden=32&heads=2&seed=1")
    tok.padding_side = "left"
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model).eval()
    with torch.no_grad():  # targets that differ from the online heads and matter at beta = 2
        for p in [*heads.target_q1.parameters(), *heads.target_q2.parameters(), *heads.v_head.parameters()]:
            p.normal_(0.0, 0.5)
    return model, tok, heads, enc


def _gen(setup, **kw) -> torch.Tensor:
    model, tok, heads, enc = setup
    args = {"max_new_tokens": 8, "beta": 2.0, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return generate_guided(model, heads, enc["input_ids"], enc["attention_mask"], **{**args, **kw})


def test_cache_equals_recompute_greedy(setup) -> None:
    cached, recomputed = _gen(setup, use_cache=True), _gen(setup, use_cache=False)
    assert cached.shape == (len(PROMPTS), setup[3]["input_ids"].shape[1] + 8)
    assert torch.equal(cached, recomputed)


def test_cache_equals_recompute_sampling(setup) -> None:
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    cached = _gen(setup, use_cache=True, generator=torch.Generator().manual_seed(7), **kw)
    recomputed = _gen(setup, use_cache=False, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(cached, recomputed)
    other = _gen(setup, use_cache=True, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(cached, other)  # the seed matters: this really samples


def test_left_padding_does_not_change_a_row(setup) -> None:
    model, tok, heads, enc = setup
    batched = _gen(setup)
    width = enc["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        alone = generate_guided(model, heads, ids, max_new_tokens=8, beta=2.0, eos_token_id=tok.eos_token_id)
        assert torch.equal(alone[0, ids.shape[1]:], batched[i, width:])


def test_first_token_is_argmax_of_guided_scores(setup) -> None:
    model, tok, heads, enc = setup
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # count from each row's first real token
    out = model(**enc, position_ids=positions, output_hidden_states=True)  # the last position is real in all rows
    q, v = heads.decode_values(out.hidden_states[-1][:, -1])
    expected = guided_logits(out.logits[:, -1], q, v, beta=2.0).argmax(-1)
    assert torch.equal(_gen(setup, max_new_tokens=1)[:, -1], expected)
    plain = _gen(setup, beta=0.0)
    assert not torch.equal(_gen(setup, beta=50.0), plain)  # strong guidance changes the text


def test_beta_zero_is_plain_greedy_generate(setup) -> None:
    model, tok, heads, enc = setup
    first = _gen(setup, beta=0.0, max_new_tokens=3)
    eos = int(first[0, -1])  # row 0 stops after 3 tokens, the others when (if) they emit it
    ours = generate_guided(model, None, enc["input_ids"], enc["attention_mask"], max_new_tokens=10, beta=0.0,
                           eos_token_id=eos, pad_token_id=tok.pad_token_id)
    theirs = model.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, theirs)
    assert (ours[0, enc["input_ids"].shape[1] + 3:] == tok.pad_token_id).all()  # padded after its eos


def test_cache_feeds_one_token_per_step(setup) -> None:
    """The cached path really uses the cache (else the equality tests above would prove nothing)."""
    model = setup[0]
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        width = setup[3]["input_ids"].shape[1]
        _gen(setup, max_new_tokens=4, use_cache=True)
        assert seen == [width, 1, 1, 1]
        seen.clear()
        _gen(setup, max_new_tokens=4, use_cache=False)
        assert seen == [width, width + 1, width + 2, width + 3]
    finally:
        hook.remove()
