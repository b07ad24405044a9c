"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py wschat:app`` serves :data:`app`.

Importing this module builds the worker's app from the environment (gunicorn
imports it in each worker, after gevent has patched it); gunicorn's
``post_worker_init`` hook then starts it (:func:`wschat.factory.attach_worker`).
"""

from __future__ import annotations

from .config import exit_on_config_error
from .factory import create_app

with exit_on_config_error():
    app = create_app()
