"""The buffer daemon: staleness-aware replay buffer, prompt cursor and control plane of a job.

Parts: ``staleness`` (admission and consumption rules, STALENESS.md), ``credits`` (cursor, leases),
``replay_buffer`` (the store), ``wal`` (durability), ``handout`` (batches), ``control`` (version,
roster, plans), ``instruments`` (metrics), ``recovery`` (restart); ``service`` is the loop that wires
them. Run it with ``python -m buffer [--config-file PATH] [key=value ...]``.
"""
