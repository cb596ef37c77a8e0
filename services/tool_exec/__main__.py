"""python -m services.tool_exec"""

import sys

from services.tool_exec.main import main

sys.exit(main())
