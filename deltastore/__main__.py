"""`python -m deltastore` is the `deltastore` console script."""

import sys

from deltastore.cli import main

sys.exit(main())
