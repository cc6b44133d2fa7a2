"""The ``prismoe`` command line: a thin click layer over :mod:`prismoe_store`."""
