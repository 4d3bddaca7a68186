"""The engine process's bookkeeping: requests, the scheduler, the KV cache manager and its block
pool, and the plain data a step hands to the executor and gets back."""
