"""Weights: the model a job trains and serves, and what two weight-sync peers must share.

Holds ``hf`` (find ``model.path`` and build or load the causal LM), ``lora`` (adapters, the same on
trainer and engine) and ``versions`` (torch, CUDA and NCCL versions of a weight-sync peer).

Invariants: the top wing: it imports the wings below it, and no wing imports it.
"""
