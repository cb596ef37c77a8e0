"""python -m services.reasoning"""

import sys

from services.reasoning.main import main

sys.exit(main())
