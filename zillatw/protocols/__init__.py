"""Moved: the binding types live in zillatw.bindings (one package each). These modules keep the
embedding imports of zillatw 0.1 working (`zillatw.protocols.http.HttpServer`,
`zillatw.protocols.ws.WsServer`); new code imports from zillatw.bindings."""
