"""The ws binding."""
