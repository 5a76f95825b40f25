"""The http binding."""
