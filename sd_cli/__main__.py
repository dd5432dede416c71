"""`python -m sd_cli` is `sd-txt2img`."""

import sys

from .cli import main

sys.exit(main())
