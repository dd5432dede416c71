"""`python -m sd_cli.train_demo`: retrain the demo model (flags: sd_cli/cli/train_demo.py)."""

import sys

from sd_cli.cli.train_demo import main

if __name__ == "__main__":
    sys.exit(main())
