"""One module per binding type, each describing itself with a `PLUGIN` record
(zillatw.config.plugins.BindingType): its schema patch, the stream kinds it accepts and hands on,
its checks and its build(binding, graph). zillatw.runtime.standard lists the built-in ones."""
