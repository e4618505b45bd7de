"""Records and jobs: resumable append-only outputs (resumable) and data-parallel sharded jobs (jobs)."""
