"""Things built on features: exact search (``search``), picture grids (``grid``), training plots (``plots``)."""
