"""Options of the commands that talk to a running proxy (``fleet ...``, ``top``)."""

from __future__ import annotations

import click

url_option = click.option(
    "--url",
    default="http://127.0.0.1:11435",
    show_default=True,
    envvar="OLLAMA_METER_URL",
    show_envvar=True,
    help="The proxy.",
)
key_option = click.option(
    "--key",
    default=None,
    envvar="OLLAMA_METER_KEY",
    show_envvar=True,
    help="An admin API key (with access control on).",
)
