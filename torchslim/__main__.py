"""``python -m torchslim`` runs the ``torchslim`` command."""

import sys

from torchslim.cli import main

sys.exit(main())
