"""``python -m gradharmony`` (and ``torchrun ... -m gradharmony``) runs the command line."""

import sys

from gradharmony.cli import main

sys.exit(main())
