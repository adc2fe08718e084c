"""The HTTP API's routers, one module per resource (``jobs``, ``results``, ``models``,
``health``), and the typed dependencies they share (``deps``).

:func:`scheduler.api.create_app` includes each router; a router holds only its routes and
reads the process's shared objects (settings, sessions, dispatcher) through :mod:`.deps`.
"""
