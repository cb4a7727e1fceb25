"""`python -m vlmq ...`: the same command line as the `vlmq` console script."""

from vlmq.cli import main

main()
