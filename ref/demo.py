"""`python -m ref.demo`: generate with the reference engine on the embedded tiny model."""

from ref import LLM, SamplingParams
from ref.models import tiny_checkpoint


def main() -> None:
    model = tiny_checkpoint()
    llm = LLM(model)
    prompts = ["Once upon a time", "The engine reads a request", "def add(a, b):"]
    params = [SamplingParams(temperature=0, max_tokens=24),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24),
              SamplingParams(temperature=1.0, top_k=20, seed=1, max_tokens=24, logprobs=2)]
    for out in llm.generate(prompts, params):
        c = out.outputs[0]
        print(f"{out.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, finish={c.finish_reason})")


if __name__ == "__main__":
    main()
