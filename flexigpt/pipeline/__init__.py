"""Pipeline plumbing: the stage kit every stages/*.py script runs in, the CLI, the params schema."""
