"""``python -m sela.registry labels ...``: the same as the ``sela`` command."""

import sys

from sela.registry.cli import main

sys.exit(main())
