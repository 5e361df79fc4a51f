"""Head analysis (not implemented yet)."""
