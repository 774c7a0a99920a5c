"""The `imagen` command line."""
