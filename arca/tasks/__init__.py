"""Problem sources, prompts and graders: tables and strings in and out, no torch."""
