"""wschat: a WebSocket chat server (gunicorn + gevent + Flask).

``gunicorn -c gunicorn.conf.py wschat:app`` serves it. ``app`` (built by
:mod:`wschat.wsgi`) and ``create_app`` (:mod:`wschat.factory`) are loaded on
first access only, so importing ``wschat.protocol`` and friends builds nothing,
and nothing in the package imports this root module for them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .version import __version__

__all__ = ["create_app", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "app":
        try:
            return import_module(".wsgi", __name__).app
        except AttributeError as exc:  # would read as "no attribute 'app'" to gunicorn
            raise RuntimeError(f"building the app failed: {exc!r}") from exc
    if name == "create_app":
        return import_module(".factory", __name__).create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
