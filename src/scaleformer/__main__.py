"""``python -m scaleformer ...`` (and ``torchrun -m scaleformer train ...``) = the ``scaleformer`` command."""

import sys

from scaleformer.cli import main

sys.exit(main())
