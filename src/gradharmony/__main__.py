"""``python -m gradharmony`` (and ``torchrun ... -m gradharmony``) runs the toolkit's command line."""

import sys

from gradharmony._entry import main

sys.exit(main())
