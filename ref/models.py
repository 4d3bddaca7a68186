"""The embedded default model: deterministic random-init tiny HF checkpoints, written locally.

Nothing is downloaded. `tiny_checkpoint()` builds a tiny config of a supported family with
transformers, fills every parameter (norm weights and biases included, so a loader that skipped
one would be caught) from a seeded generator, trains a byte-level BPE tokenizer on an embedded
corpus, and writes both with `save_pretrained`. Same arguments => byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Tiny shapes: big enough to exercise GQA, several layers and a real tokenizer; small enough
# that a CPU test runs thousands of forward passes.
TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False},
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
WEIGHT_STD = 0.1  # larger than HF's 0.02 so tiny models have peaked, non-degenerate logits

CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged cache stores keys and values in blocks.
Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.
Every morning he walked to the harbor, counted his nets, and watched the gulls circle above.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 3.14159 2.71828 -7 +3 = 99%.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n
Attention is computed over every token that came before; the scheduler decides who runs next.
She said: "Hello, world!" and he answered, 'Goodbye; see you tomorrow?' Then silence fell.
Rivers flow to the ocean, clouds return the water, and the mountains wait for the snow.
The engine reads a request, plans a step, fills a batch, runs the model, and samples a token.
Prefix caching shares blocks between requests whose prompts begin with the same words.
Mixed case, CamelCase, snake_case, kebab-case, ALL CAPS, and émigré café naïve façade.
Lists: apples, oranges, pears; colors: red, green, blue; days: Monday, Tuesday, Friday.
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _save_tokenizer(out: Path, vocab_size: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.save_pretrained(str(out))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter from one seeded generator, in state-dict order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(WEIGHT_STD * noise)


def hf_config(family: str = "llama", **overrides):
    """A transformers config object of the family with TINY_CONFIG shapes plus `overrides`."""
    from transformers import AutoConfig

    if family not in FAMILY_EXTRAS:
        raise ValueError(f"family={family!r} is not supported; allowed: {sorted(FAMILY_EXTRAS)}")
    unknown = set(overrides) - set(TINY_CONFIG) - {
        "rope_parameters", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    }
    if unknown:
        raise ValueError(f"unknown config overrides {sorted(unknown)}")
    kwargs = {**TINY_CONFIG, **FAMILY_EXTRAS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def write_checkpoint(out: str | Path, config, seed: int = 0, tokenizer: bool = True) -> Path:
    """Random-init `config` with `seed` and save model (+ tokenizer) to `out` via save_pretrained."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    torch.manual_seed(seed)  # HF's own init runs first; _randomize then overwrites every value
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    model.save_pretrained(str(out))
    if tokenizer:
        _save_tokenizer(out, config.vocab_size)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("PAGEDLM_CACHE", Path.home() / ".cache" / "pagedlm"))


def tiny_checkpoint(
    family: str = "llama",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Path of the tiny `family` checkpoint for `seed` (written once, then reused from cache)."""
    config = hf_config(family, **overrides)
    key = json.dumps({"family": family, "seed": seed, "tokenizer": tokenizer, **overrides},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-{family}-{digest}"
    if (path / "config.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    # Write into a private temp dir, then rename: concurrent test workers never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=root))
    try:
        write_checkpoint(tmp, config, seed, tokenizer)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by readers
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; its files are identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
