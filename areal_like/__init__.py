"""areal-like: asynchronous streaming RL for LLM post-training (shared core).

The process packages (``buffer``, ``rollout_server``, ``trainer``, ``launch``) import only from
here, never from each other.
"""

__version__ = "0.1.0"
