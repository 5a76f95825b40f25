"""The binding types zillatw serves, one package each (what zilla.yaml calls bindings)."""
