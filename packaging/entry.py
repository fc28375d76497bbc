"""The bundle's entry point: the `kimi-desktop` console script (pyproject [project.scripts])."""

import sys

from kimi_desktop.cli import main

if __name__ == "__main__":
    sys.exit(main())
