"""The status page and ``ollama-meter top``: the proxy's state at a glance."""
