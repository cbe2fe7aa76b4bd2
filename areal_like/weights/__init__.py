"""Weights: the model a job trains and serves, and what two weight-sync peers must share.
Invariant: the top wing: it imports the wings below it, and no wing imports it.
"""
