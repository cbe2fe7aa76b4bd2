"""The buffer daemon: staleness-aware replay buffer, prompt cursor and control plane of a job.

``staleness.StalenessPolicy`` (admission and consumption rules, see STALENESS.md),
``credits.CreditLedger`` (prompt cursor, leases), ``replay_buffer.ReplayBuffer`` (the group store),
``wal.WriteAheadLog`` (durability), ``recovery.recover`` (restart) and ``service.BufferService``
(the loop). Run it with ``python -m buffer [--config-file PATH] [key=value ...]``.
"""
