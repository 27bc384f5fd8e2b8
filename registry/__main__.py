"""``python -m registry labels ...``: the same as the ``sela`` command."""

import sys

from registry.cli import main

sys.exit(main())
