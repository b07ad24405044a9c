"""wschat: a WebSocket chat server (gunicorn + gevent + Flask).

``gunicorn -c gunicorn.conf.py wschat:app`` serves it; ``app`` is built on
first access, so importing ``wschat.protocol`` and friends builds nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from .version import __version__

__all__ = ["create_app", "__version__"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    from .factory import create_app as factory

    return factory(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "app":
        from .config import ConfigError

        try:
            application = create_app()
        except ConfigError as exc:
            # One clear line, no traceback; exit status 3 is gunicorn's "worker failed to
            # boot", which stops the master instead of respawning the worker forever.
            print(f"wschat: configuration error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        except AttributeError as exc:  # would read as "no attribute 'app'" to gunicorn
            raise RuntimeError(f"building the app failed: {exc!r}") from exc
        globals()["app"] = application
        return application
    raise AttributeError(name)
