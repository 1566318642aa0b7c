"""``python -m sidecar`` is ``llm-sidecar``."""

import sys

from sidecar.cli import main

sys.exit(main())
