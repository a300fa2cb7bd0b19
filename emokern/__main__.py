"""``python -m emokern`` is the ``emokern`` command."""

import sys

from emokern.cli import main

sys.exit(main())
