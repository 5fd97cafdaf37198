"""``python -m axpo_nemo.cli``: the ``axpo`` command."""

import sys

from axpo_nemo.cli import main

sys.exit(main())
