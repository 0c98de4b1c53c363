"""``python -m unimoe.demo [MODEL] [--host H] [--port N] [--share]`` (the same as ``unimoe demo``)."""

import sys

from unimoe.demo import main

sys.exit(main())
