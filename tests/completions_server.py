"""A minimal OpenAI-compatible ``/v1/completions`` server over a local HF causal LM: a test double
for ``vllm serve runs/x/final``, never product code (only tests/ and benchmarks/ may import it).

It does what vLLM's completions route does with a plain-text prompt: tokenize it (adding special
tokens unless the request says ``add_special_tokens: false``), decode greedily up to ``max_tokens``
with ``transformers``' own ``generate``, and cut the text at the first ``stop`` string (left out).
Requests are served one at a time; every prompt it received is kept in ``prompts`` for assertions.
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

    def __init__(self, model_dir: str, served_name: str) -> None:
        from subq.learner.models import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(model_dir)
        self.model.eval()
        self.served_name = served_name
        self.prompts: list[str] = []
        self._lock = threading.Lock()
        self._bind(self._app())

    def complete(self, prompt: str, max_tokens: int, stop: list[str], add_special_tokens: bool) -> dict[str, Any]:
        ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
        with self._lock, torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id or 0)
        new = out[0, ids.shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=None)
        return {"text": text[:cut], "finish_reason": "stop" if cut is not None else "length",
                "prompt_tokens": ids.shape[1], "completion_tokens": len(new)}

    def _app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.served_name, "object": "model", "owned_by": "test"}]}

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
