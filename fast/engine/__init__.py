"""The engine layer: `LLM` (offline), `LLMEngine` (schedule -> execute -> update, one step at a
time) and `AsyncLLMEngine` (a background step loop for servers)."""
