"""``python -m agentctl``."""

import sys

from agentctl.cli import main

sys.exit(main())
