"""Running the agent: one episode (`episode`), many at once into a resumable JSONL
(`engine`), a rollout job that names all of it (`job`), its shards (`shards`), and the hook
through which a teacher reviews each step (`review`)."""
