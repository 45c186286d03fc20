"""The HTTP API: wire models, dependencies, errors and routes."""
