"""The tcp binding: listeners (server) and upstream connections (client)."""
