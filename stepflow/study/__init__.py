"""The study: the whole pipeline over several seeds, in resumable chunks, and its summary.

Each seed writes under `<study.root>/seed-<n>/` (its own split of train into U1/U2 and its
own training runs); the test instances are the same for every seed. A stage whose outputs
already match its inputs is skipped (`seeds`), so a study stopped anywhere (a chunk's time is
up, the machine went away) goes on from where it stopped. `summary` writes the results over
the seeds.
"""
