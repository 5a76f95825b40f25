"""The tls binding: server, client and their contexts."""
