"""Serving: an OpenAI-compatible HTTP server (``hybridfast serve``) and the pieces the
lm-evaluation-harness model shares with it.

* :mod:`.methods` — the methods a request selects and their settings;
* :mod:`.model_set` — the loaded models, and schedulers / power samplers for settings;
* :mod:`.worker` — the one thread that runs the models (continuous batching + power jobs);
* :mod:`.text` — incremental detokenization and stop strings;
* :mod:`.protocol` — request bodies and response objects;
* :mod:`.server`, :mod:`.app` — request handling on the event loop, the FastAPI app (``create_app``);
* :mod:`.cli` — the ``hybridfast serve`` command.

Importing this package imports neither FastAPI nor torch; :mod:`.app` needs the ``serve`` extra.
"""
