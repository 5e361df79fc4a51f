"""Package data: built-in head profiles."""
