"""`python -m retrofit` and the `retrofit` console script.

The command line itself lives in :mod:`retrofit.cli`; it is imported here, inside the Ctrl-C handling, because
importing torch and Lightning takes seconds and a person may stop the command during them.
"""

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("retrofit: error: interrupted by Ctrl-C.", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
