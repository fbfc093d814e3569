"""A teacher/solver endpoint for commands: the user's URL, or our own server on a local model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_teacher(base_url: str | None, local_model: str, port: int) -> Iterator[tuple[str, str | None]]:
    """Yield ``(base_url, served_model_name)``; the name is None for a user-given endpoint.

    Without ``base_url``, ``local_model`` is served on 127.0.0.1:``port`` through Ray Serve for
    the duration of the block, then shut down (also on Ctrl-C and errors).
    """
    if base_url:
        yield base_url, None
        return
    from subq.learner.models import resolve_model_path
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    resolve_model_path(local_model)  # a missing model fails here, in one line, not in a replica
    # Half a CPU reserved: a whole-CPU reservation beside a decomposer and actor pools would starve
    # Ray's own tasks on a 2-core machine; but the model is the stage's real work, so it decodes on
    # every core (torch threads would otherwise follow the reservation: 1).
    cfg = LLMServerConfig(model=local_model, port=port, num_cpus=0.5, torch_threads=os.cpu_count())
    from subq.resources import require, serve_demand

    require([serve_demand("the local teacher/solver server", cfg.num_cpus, cfg.num_gpus)])
    url = start_llm_server(cfg)
    try:
        yield url, cfg.served_model_name
    finally:
        stop_llm_server(cfg)
