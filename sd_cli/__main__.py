"""`python -m sd_cli` is `sd-txt2img`."""

import sys

from sd_cli.cli import main

sys.exit(main())
