"""`python -m flows <stage>`: the `stepflow flow` commands, each stage as its Prefect flow run
(what dvc.yaml's stages call)."""

from flows.cli.flow import main

main()
