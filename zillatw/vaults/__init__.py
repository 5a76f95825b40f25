"""Vault types: where keys, certificates and trust come from."""
