"""ditplan's planner: enumerate, prune, rank and explain hybrid configurations; the CLI."""
