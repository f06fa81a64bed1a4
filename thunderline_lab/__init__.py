"""thunderline-lab."""
