"""Weights: the model a job trains and serves, and a weight sync: its plan, which both peers share
(``plan``), the trainer's side (``push``) and the rollout server's (``server_sync``).
Invariant: the top wing: it imports the wings below it, and no wing imports it.
"""
