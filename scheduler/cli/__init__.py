"""The ``mriq`` command line: submit and follow jobs, read results, manage models, run services.

Settings are read once, in the root callback (``load_settings``), and handed to every command
through the Typer context. Tables go to stdout (``--json`` prints exactly one JSON document
instead); progress bars and notes go to stderr so stdout stays pipeable. Known errors print a
one-line message and exit 1 (runtime) or 2 (refused input) without a traceback.

The CLI never imports torch: training runs in worker processes. With the embedded default
(SQLite + filesystem broker) ``--wait`` and ``mriq demo`` start a worker subprocess for the
duration when none answers a ping.

Modules: :mod:`~scheduler.cli.app` (the Typer tree, runtime, error mapping),
:mod:`~scheduler.cli.render` (output), :mod:`~scheduler.cli.waiting` (following a job), and
one module per group of commands. Importing them registers their commands, in the order
``mriq --help`` lists them.
"""

from scheduler.cli import submit as submit  # noqa: I001  (import order = command order)
from scheduler.cli import results as results
from scheduler.cli import explain as explain
from scheduler.cli import services as services
from scheduler.cli import demo as demo
from scheduler.cli import jobs as jobs
from scheduler.cli import models as models
from scheduler.cli.app import app, main

__all__ = ["app", "main"]
