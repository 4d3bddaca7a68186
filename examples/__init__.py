"""Examples a reader can copy (run them from the repository root)."""
