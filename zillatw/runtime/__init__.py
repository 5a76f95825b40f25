"""The running gateway: the binding graph, generations, reload, shutdown, workers, the reactor."""
