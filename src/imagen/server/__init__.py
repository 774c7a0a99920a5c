"""The HTTP API and web page (`imagen serve`)."""
