"""``python -m seismo``: the ``seismo`` command line."""

import sys

from seismo.cli import main

sys.exit(main())
