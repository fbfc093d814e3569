"""Process set-up shared by every command: environment defaults, then Ray.

The defaults must be in the environment before Ray starts (DESIGN §4): Ray 2.60 may turn token
auth on from leftover state in ~/.ray, usage stats would phone home, and the hub must never be
reached at run time.
"""

from __future__ import annotations

import logging
import os
import warnings

ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "1",
}


def configure_env() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def init_ray(address: str | None = None, *, quiet: bool = True) -> None:
    """Join ``address`` (or $RAY_ADDRESS, e.g. inside ``ray job submit``), else start local Ray."""
    configure_env()
    import ray

    if quiet:  # our progress bars and summaries say what matters; Ray's INFO lines bury them
        import ray.data  # noqa: F401 - configures its loggers on import; we lower them after

        for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)
