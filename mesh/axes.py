"""Mesh axis names, defined once. Kernels name the axis they talk along; executors bind them."""

ROW = "row"  # mesh rows: the first core axis
COL = "col"  # mesh columns: the second core axis

# Scope names the profiler reads (mesh/trace.py): every all-reduce call runs in ALLREDUCE_SCOPE;
# a ppermute whose permutation is padded with filler routes (vmap accepts only full permutations)
# runs in f"{ROUTES_SCOPE_PREFIX}{k}", where its first k pairs are the real routes.
ALLREDUCE_SCOPE = "allreduce"
ROUTES_SCOPE_PREFIX = "routes_"
