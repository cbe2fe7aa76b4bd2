"""areal-like: asynchronous streaming RL for LLM post-training (shared core).

The process packages (``buffer``, ``rollout_server``, ``trainer``, ``launch``) import only from
here, never from each other. The core is a floor of wings, each importing only from itself and
the wings below it: ``wire``, ``net``, ``settings``, ``tasks``, ``weights``; ``daemon`` and
``job_facts`` sit above them all (areal_like/DESIGN.md, section 7).
"""

__version__ = "0.1.0"
