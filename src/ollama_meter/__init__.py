"""ollama-meter: a transparent streaming reverse proxy for Ollama that meters every token."""

__version__ = "0.1.0"
