"""Iterated distillation: the student decomposes the training problems, the teacher judges, the student retrains.

Both papers distil once. Here round 1 is the ordinary pipeline (the teacher decomposes, the students
train); each round r > 1 then

1. serves round r-1's chosen student (``rounds_student``, default BC) on Ray Serve;
2. collects its decompositions of the training problems into the same store (``actors.student``):
   the teacher answers and judges them exactly as its own and pays only for that; the rows carry the
   student's content fingerprint (``policy``, in their key) and ``round = r``;
3. retrains every configured algorithm from round r-1's student on ``rounds_mix``: ``latest`` (round
   r's rows only), ``all`` (every round, the teacher's included) or ``teacher+correct`` (the teacher's
   rows plus the students' rows whose answer was correct), into ``OUT/round-r/train/<run>``;
4. evaluates them (``OUT/round-r/eval``) and adds a row to ``OUT/rounds/rounds.{json,md,png}``.

Round 1 keeps the pipeline's layout (``OUT/train``, ``OUT/eval``) and trains on the teacher's rows
only once rounds are on. Every step resumes (collection key by key, training by its record), and the
collection budget is one, over the store's ledger, across all rounds. See docs/rounds.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from subq.actors.student import StudentEndpoint
from subq.eval_setup import ServeOptions, open_decomposer, parse_openai_decomposer

MIXES = ("latest", "all", "teacher+correct")


def policy_of(spec: str, opts: ServeOptions | None = None) -> str:
    """The ``policy`` tag of a student spec: a served directory's content hash (``sha256:...``), a
    registry name as given; beta joins it when set (it changes what the student writes)."""
    from subq.learner.content_hash import model_fingerprint

    policy = model_fingerprint(spec) or spec
    beta = opts.beta if opts is not None else None
    return policy if beta is None else f"{policy}?beta={beta}"


@contextmanager
def student_decomposer(spec: str, opts: ServeOptions, *, api_key_env: str = "OPENAI_API_KEY",
                       timeout_s: float = 120.0, index: int = 0) -> Iterator[tuple[StudentEndpoint, str]]:
    """(endpoint, policy) of a collection decomposer spec, ready to call until the block ends.

    ``openai:MODEL@BASE_URL``: a student behind any OpenAI-compatible server, prompted in its training
    format over ``/completions`` (its policy: what ``/models`` says it serves, hashed). Anything else
    ``subq eval`` serves (a checkpoint directory, ``embedded:`` / ``tiny-random:``) is served on Ray
    Serve for the block and asked over its chat route (its policy: the directory's content hash).
    """
    if spec.startswith("openai:"):
        from subq.eval_setup import decomposer_identity
        from subq.evaluation.fingerprint import fingerprint

        model, url = parse_openai_decomposer(spec)
        identity = decomposer_identity(spec, [], opts, api_key_env=api_key_env)
        yield (StudentEndpoint(base_url=url, model=model, api="completions", api_key_env=api_key_env,
                               timeout_s=timeout_s), f"openai:{fingerprint(identity)}")
        return
    if spec.startswith(("http://", "https://", "teacher", "none")):
        raise ValueError(f"--decomposer {spec!r}: expected a checkpoint / model to serve or openai:MODEL@BASE_URL "
                         "(the teacher decomposes when --decomposer is left out)")
    from subq.serve.decomposer import served_name

    policy = policy_of(spec, opts)
    with open_decomposer(spec, index, [], opts, identity={"kind": "served", "model": policy}) as served:
        yield (StudentEndpoint(base_url=f"{served.url.rstrip('/')}/v1", model=served_name(spec), api="chat",
                               timeout_s=timeout_s), policy)


def check_decomposer_spec(spec: str) -> None:
    """Fails in one line (ValueError) for a spec that cannot be a collection decomposer; no network."""
    from pathlib import Path

    if spec.startswith("openai:"):
        parse_openai_decomposer(spec)
        return
    if spec.startswith(("http://", "https://", "teacher", "none")):
        raise ValueError(f"--decomposer {spec!r}: expected a checkpoint / model to serve or openai:MODEL@BASE_URL")
    if not (spec.startswith(("embedded:", "tiny-random:")) or Path(spec).expanduser().is_dir()):
        raise ValueError(f"--decomposer {spec!r}: not a directory (a checkpoint or model to serve), nor "
                         "openai:MODEL@BASE_URL")
