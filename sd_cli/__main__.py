"""`python -m sd_cli` is `sd-txt2img`; `python -m sd_cli img2img ...` is `sd-img2img ...`."""

import sys

from sd_cli.cli import run

if len(sys.argv) > 1 and sys.argv[1] in ("img2img", "txt2img"):
    command = sys.argv.pop(1)
    run(command)
else:
    run()
