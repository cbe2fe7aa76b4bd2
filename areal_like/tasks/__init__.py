"""Tasks: what a prompt is, how it becomes tokens, how a response is scored. Invariants: imports
only the wings below (``wire``, ``net``, ``settings``); this file imports nothing, so a reward
worker importing ``areal_like.tasks.callables`` or ``.rewards`` pulls in nothing else.
"""
