"""`python -m flows.cli`: the `stepflow` command line."""

from flows.cli import main

main()
