"""The data of the method: the trajectory schema and its JSONL files, the task space's split
(manifest), the verified golden trajectories D1/D2 (the `prepare` stage), instance selection
and conversion to and from other projects' conversation format."""
