"""Training scripts for the built-in models (not part of the installed package)."""
