"""``python -m smml_lightning``: the ``smml`` command with this interpreter."""

from .cli import main

main()
