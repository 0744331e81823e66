"""``python -m ollama_meter``: the same as the ``ollama-meter`` command."""

from .cli import main

if __name__ == "__main__":
    main()
