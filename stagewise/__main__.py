"""`python -m stagewise`, the twin of the `stagewise` command."""

import sys

from stagewise.cli import main

if __name__ == "__main__":
    sys.exit(main())
