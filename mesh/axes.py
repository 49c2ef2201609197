"""Mesh axis names and the named-scope names the profiler reads, defined once.

Kernels name the axis they talk along; executors bind them. Programs open `jax.named_scope`s with
the names below, and the profiler (mesh/trace.py, mesh/cost_model.py, model/trace_decode.py)
groups a trace by them, so a scope and its grouping cannot drift apart.
"""

ROW = "row"  # mesh rows: the first core axis
COL = "col"  # mesh columns: the second core axis

# Every all-reduce call runs in ALLREDUCE_SCOPE; a ppermute whose permutation is padded with filler
# routes (vmap accepts only full permutations) runs in f"{ROUTES_SCOPE_PREFIX}{k}", where its first
# k pairs are the real routes.
ALLREDUCE_SCOPE = "allreduce"
ROUTES_SCOPE_PREFIX = "routes_"
# A segmented all-reduce (each run of m contiguous cores reduces on its own) runs in
# f"{SEGMENT_SCOPE_PREFIX}{m}".
SEGMENT_SCOPE_PREFIX = "segment_"

# The stages of a decode step, the kernels the profiler reports per token.
EMBED_SCOPE = "embed"
ATTENTION_SCOPE = "attention"
MLP_SCOPE = "mlp"
LM_HEAD_SCOPE = "lm_head"
SAMPLE_SCOPE = "sample"
KERNEL_SCOPES = (EMBED_SCOPE, ATTENTION_SCOPE, MLP_SCOPE, LM_HEAD_SCOPE, SAMPLE_SCOPE)
# Layer i of a model runs in layer_scope(i).
LAYER_SCOPE_PREFIX = "layer"


def layer_scope(i: int) -> str:
    """The named scope of layer i."""
    return f"{LAYER_SCOPE_PREFIX}{i}"
