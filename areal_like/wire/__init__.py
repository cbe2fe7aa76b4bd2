"""The wire: the bytes processes exchange and store (the WAL holds the same frames), each format
defined once. Invariant: the lowest wing; it imports no other wing of ``areal_like``, so a format
reads the same in every process that decodes it.
"""
