"""pagedlm conformance suite: checks any vLLM-shaped engine against the reference oracle."""
