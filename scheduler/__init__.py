"""mriq scheduler: the control plane (SQL schema, repository, HTTP API, the mriq CLI). No torch."""
