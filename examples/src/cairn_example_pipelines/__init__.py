"""Example Cairn pipelines (see README.md: "Write your own pipeline")."""
