"""The operator console at `{prefix}/console`: server-rendered pages, a signed session, a few lines of JS."""
