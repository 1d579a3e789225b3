"""``python -m dptrain``: the ``dptrain`` command line (:mod:`dptrain.cli`)."""

import sys

from .cli import main

sys.exit(main())
