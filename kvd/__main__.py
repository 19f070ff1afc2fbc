"""``python -m kvd`` runs the daemon."""

import sys

from .cli import main

sys.exit(main())
