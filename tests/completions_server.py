"""A minimal OpenAI-compatible ``/v1/completions`` server over a local HF causal LM: a test double
for ``vllm serve runs/x/final``, never product code (only tests/ and benchmarks/ may import it).

It does what vLLM's completions route does with a plain-text prompt: tokenize it (adding special
tokens unless the request says ``add_special_tokens: false``), decode greedily up to ``max_tokens``
with ``transformers``' own ``generate``, and cut the text at the first ``stop`` string (left out).
Requests are served one at a time; every prompt it received is kept in ``prompts`` for assertions
(never reset: a test counts requests across runs). ``load`` puts another checkpoint behind the same
name and URL, as a retrained model redeployed in place; its ``/v1/models`` entry reports ``root`` as
vLLM does, and a ``fingerprint`` only when given one (subq's own server reports its content hash).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.teacher_server import ThreadedServer


class CompletionsServer(ThreadedServer):
    """``with CompletionsServer(model_dir, "runs/x/final") as srv: srv.base_url``."""

    name = "completions-server"

    def __init__(self, model_dir: str, served_name: str, fingerprint: str | None = None) -> None:
        self.served_name = served_name
        self.prompts: list[str] = []
        self._lock = threading.Lock()
        self.load(model_dir, fingerprint)
        self._bind(self._app())

    def load(self, model_dir: str, fingerprint: str | None = None) -> None:
        """Serve ``model_dir`` from now on, under the same name and URL."""
        from subq.learner.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_dir)
        model.eval()
        with self._lock:
            self.model, self.tokenizer, self.fingerprint = model, tokenizer, fingerprint

    def complete(self, prompt: str, max_tokens: int, stop: list[str], add_special_tokens: bool) -> dict[str, Any]:
        ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
        with self._lock, torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id or 0,
                                      tokenizer=self.tokenizer)  # a subq checkpoint's generation config has stop strings
        new = out[0, ids.shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=None)
        return {"text": text[:cut], "finish_reason": "stop" if cut is not None else "length",
                "prompt_tokens": ids.shape[1], "completion_tokens": len(new)}

    def _app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            card = {"id": self.served_name, "object": "model", "created": int(time.time()), "owned_by": "test",
                    "root": self.served_name, "parent": None, "permission": [{"id": f"perm-{time.time()}"}]}
            return {"object": "list", "data": [card | ({"fingerprint": self.fingerprint} if self.fingerprint else {})]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            if body.get("model") != self.served_name:
                return JSONResponse({"error": {"message": "no such model", "code": "model_not_found"}}, 404)
            self.prompts.append(body["prompt"])
            stop = [body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop") or [])
            r = self.complete(body["prompt"], int(body.get("max_tokens") or 16), stop,
                              bool(body.get("add_special_tokens", True)))
            return JSONResponse({
                "id": "cmpl-test", "object": "text_completion", "created": int(time.time()), "model": self.served_name,
                "choices": [{"index": 0, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}],
                "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                          "total_tokens": r["prompt_tokens"] + r["completion_tokens"]},
            })

        return app
