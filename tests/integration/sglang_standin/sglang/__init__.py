"""Stand-in for the ``sglang`` package in CPU tests; see ``launch_server``."""
