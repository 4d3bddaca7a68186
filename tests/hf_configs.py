"""Hypothesis strategies for random tiny configs of every supported family (shared by tests)."""

from __future__ import annotations

from hypothesis import strategies as st

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@st.composite
def tiny_configs(draw, families=FAMILIES):
    """(family, overrides) for `ref.models.hf_config`: random heads, GQA ratio, head_dim, layers."""
    family = draw(st.sampled_from(families))
    num_kv = draw(st.sampled_from([1, 2, 4]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    heads = num_kv * ratio
    overrides = dict(
        vocab_size=draw(st.integers(64, 300)),
        hidden_size=draw(st.sampled_from([32, 64, 96])),
        intermediate_size=draw(st.sampled_from([48, 128])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=256,
    )
    if family in ("llama", "qwen3") and draw(st.booleans()):
        overrides["attention_bias"] = True
    if family == "llama" and draw(st.booleans()):
        overrides["rope_parameters"] = dict(
            rope_type="llama3", rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=draw(st.sampled_from([16, 64, 8192])),
        )
    return family, overrides
