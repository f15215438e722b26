"""Built-in method plugins (installed as ``bench.methods``)."""
