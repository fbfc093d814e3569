"""subq: distil an LLM's problem-decomposition skill into a compact student, on Ray.

One installed top-level package: the wings live in the repository's top-level folders
(``actors/``, ``learner/``, ...) and are installed as ``subq.actors``, ``subq.learner``, ...
(pyproject's package-dir mapping), so no generic name lands in a user's site-packages.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from pathlib import Path as _Path

WINGS = ("protocol", "data_store", "actors", "learner", "serve", "evaluation", "cluster")

# Run from a checkout (pytest, `ray job submit --working-dir .`, a Ray worker whose working dir
# is the upload), the wings sit beside this folder rather than inside it: let `subq.<wing>`
# find them there. In an installed wheel they are inside subq/ and this adds nothing.
_here = _Path(__file__).resolve().parent
if not (_here / "learner").is_dir() and (_here.parent / "learner" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # type: ignore[name-defined]  # noqa: F821

try:
    __version__ = _metadata.version("subq")
except _metadata.PackageNotFoundError:  # a checkout that was never pip-installed
    __version__ = "0+unknown"
