"""Tasks: what a prompt is, how it becomes tokens, how a response is scored.

Holds ``task`` (the task registry, ``make_task``), ``datasets``, ``tokenizer``, ``rewards``,
environments (``environment``, ``envs``), ``tools``, ``agents``, ``callables`` (the one parser of
``"pkg.module:function"``) and the shipped ``data/``.

Invariants: imports only the wings below (``wire``, ``net``, ``settings``); this file imports
nothing, so a reward worker importing ``areal_like.tasks.callables`` or ``.rewards`` pulls in
nothing else.
"""
