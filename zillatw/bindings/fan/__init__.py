"""The fan binding, in one process or across hosts via Redis."""
