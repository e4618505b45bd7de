"""Records and jobs: reading records (records), MIMIC ids and paths (mimic), resumable append-only outputs
(resumable) and data-parallel sharded jobs (jobs)."""
