"""``python -m bench``: see bench/cli.py, or ``python -m bench --help``."""

import sys

from bench.cli import main

sys.exit(main())
