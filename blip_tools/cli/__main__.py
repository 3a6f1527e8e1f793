"""`python -m blip_tools.cli`."""

import sys

from . import main

sys.exit(main())
