"""`python -m fast.serve`: the OpenAI-compatible server (`fast/entrypoints/openai_server.py`)."""

from fast.entrypoints.openai_server import main

if __name__ == "__main__":
    main()
