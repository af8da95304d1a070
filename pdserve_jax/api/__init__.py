"""The OpenAI-compatible HTTP front end, shared by the single-process server and the
router: it knows an engine only through submit, abort, stream and stats."""
