"""``python -m services.checkpoint`` (``--help`` lists the settings)."""

import sys

from services.checkpoint.main import main

sys.exit(main())
