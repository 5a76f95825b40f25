"""zilla.yaml as data: the model, loading and checking, the JSON Schema, the plug-in contract."""
