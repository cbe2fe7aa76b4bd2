"""The buffer daemon: staleness-aware replay buffer, prompt cursor and control plane of a job
(``service.py`` wires the parts; STALENESS.md, WAL.md). Run it with ``python -m buffer``."""
