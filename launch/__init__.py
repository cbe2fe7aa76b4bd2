"""launch: starts, supervises and plans jobs (``areal-like``). From Python: ``from launch import
run, config`` (launch/api.py)."""


def __getattr__(name: str):
    """``run`` and ``config`` imported on first use: ``import launch`` (every ``areal-like``
    command) stays light."""
    if name in ("run", "config"):
        from launch import api

        return getattr(api, name)
    raise AttributeError(f"module 'launch' has no attribute {name!r}")
