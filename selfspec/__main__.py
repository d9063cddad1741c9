"""``python -m selfspec`` is the ``selfspec`` command."""

import os
import sys

from selfspec.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
