"""``python -m kvd`` runs the daemon."""

import sys

from kvd.ops.cli import main

sys.exit(main())
