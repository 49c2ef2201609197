"""Configs, weights, loaders, tokenizer; one transformer block shared by the single-device
reference, the wafer decode step and the prefill mesh; the cache it writes and its decode layout;
the wafer layout, the slot batch and the generate loop; the decode step traced for the profiler.
Never imports kvcache."""
