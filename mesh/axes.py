"""Mesh axis names, defined once. Kernels name the axis they talk along; executors bind them."""

ROW = "row"  # mesh rows: the first core axis
COL = "col"  # mesh columns: the second core axis
