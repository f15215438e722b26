"""Built-in task plugins (installed as ``bench.datasets``)."""
