"""The built-in status page (``/-/status``), its JSON (``/-/status.json``) and the memory of
recent traffic they are made from."""
