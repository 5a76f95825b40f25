"""The echo binding."""
