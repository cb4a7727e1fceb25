"""`python -m vlmq ...`: the same command line as the `vlmq` console script."""

import sys

from vlmq.cli import main

sys.exit(main())
