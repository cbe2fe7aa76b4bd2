"""Settings: the typed configuration schema, its checks, and loading it with Hydra.

Holds ``config`` (``load_config``), ``schema`` and its sections (``loss_schema``,
``report_schema``), and ``config_checks`` (``ConfigError``, ``check``, ``choice``).

Invariants: imports only the wings below (``wire``, ``net``); loading settings reads no model,
tokenizer or dataset: the facts a config implies are computed above, in
``areal_like/job_facts.py``.
"""
