"""`python -m retrofit`: the same as the `retrofit` console script."""

import sys

from .cli import main

sys.exit(main())
