"""`python -m pagoda serve ...` is the same as the `pagoda` console script."""

import sys

from pagoda.cli import main

sys.exit(main())
