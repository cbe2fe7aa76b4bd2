"""Settings: the typed configuration schema, its checks, and loading it with Hydra.
Invariant: imports only the wings below (``wire``, ``net``); loading settings reads no model,
tokenizer or dataset (the facts a config implies: ``areal_like/job_facts.py``).
"""
