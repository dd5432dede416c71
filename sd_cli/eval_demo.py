"""`python -m sd_cli.eval_demo`: the demo model's accuracy table (flags: sd_cli/cli/eval_demo.py)."""

import sys

from sd_cli.cli.eval_demo import main

if __name__ == "__main__":
    sys.exit(main())
