"""The step trace's JSON schema (SPEC "Step trace"), as JSON Schema documents.

A trace file is JSON lines: one `meta` object first, then one `step` object per engine step that
ran the model. Sample ids are '<request id>#<sample index>'. `fast` and the `ref` observer
(`fast/trace/ref_observer.py`) write the same schema; fields an engine does not have are null
(`layers_ms` when the worker runs in another process; `prefix_cache` for ref, which has none).
"""

from __future__ import annotations

_INT = {"type": "integer", "minimum": 0}
_IDS = {"type": "array", "items": {"type": "string"}}
_BLOCKS = {"type": "array", "items": _INT}
_MS = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}

META_SCHEMA = {
    "type": "object",
    "required": ["kind", "schema", "engine", "block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs",
                 "num_hidden_layers", "policy", "layers_timed"],
    "properties": {
        "kind": {"const": "meta"},
        "schema": {"const": "pagedlm-trace/1"},
        "engine": {"enum": ["fast", "ref"]},
        "model": {"type": "string"},
        "block_size": {"type": "integer", "minimum": 1},
        "num_blocks": {"type": "integer", "minimum": 1},  # ref: the KV budget in blocks of block_size slots
        "max_num_batched_tokens": {"type": ["integer", "null"]},
        "max_num_seqs": {"type": "integer", "minimum": 1},
        "max_model_len": {"type": "integer", "minimum": 1},
        "num_hidden_layers": {"type": "integer", "minimum": 1},
        "policy": {"type": "string"},
        "layers_timed": {"type": "boolean"},
    },
}

STEP_SCHEMA = {
    "type": "object",
    "required": ["kind", "step", "t_s", "duration_ms", "phases_ms", "layers_ms", "num_scheduled_tokens", "scheduled",
                 "forked", "preempted", "sampled", "finished", "waiting", "running", "kv", "block_changes",
                 "prefix_cache", "block_reuse_rate", "totals"],
    "properties": {
        "kind": {"const": "step"},
        "step": _INT,  # 0, 1, 2, ... over the steps that ran the model
        "t_s": {"type": "number", "minimum": 0},  # start, seconds since the tracer was made
        "duration_ms": {"type": "number", "minimum": 0},
        "phases_ms": _MS,  # fast: schedule / execute / update (its layer boundaries); ref: prefill or decode
        "layers_ms": {"oneOf": [_MS, {"type": "null"}]},  # inside them (fast/trace/tracer.py LAYERS)
        # fast: the step's tokens, of max_num_batched_tokens (the budget); ref: positions computed,
        # padding included (the real tokens are the sum of scheduled[*].tokens)
        "num_scheduled_tokens": _INT,
        "scheduled": {"type": "array", "items": {
            "type": "object",
            "required": ["id", "kind", "start", "tokens", "num_prompt_tokens", "num_output_tokens", "samples",
                         "admitted", "prefix_hit_tokens"],
            "properties": {
                "id": {"type": "string"},
                "kind": {"enum": ["prefill", "decode", "recompute"]},
                "start": _INT,  # tokens computed before this step (prefix hits included)
                "tokens": {"type": "integer", "minimum": 1},  # computed in this step
                "num_prompt_tokens": _INT,
                "num_output_tokens": _INT,  # before this step: the index of the token it samples
                "samples": {"type": "boolean"},  # the chunk reaches the end: a token is sampled
                "admitted": {"type": "boolean"},  # came from the waiting queue in this step
                "prefix_hit_tokens": _INT,  # on admission: tokens found in the prefix cache
                "blocks": _BLOCKS,  # fast: the blocks written, positions start .. start + tokens - 1
            },
        }},
        "forked": {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2,
                                               "maxItems": 2}},  # [parent, child]
        "preempted": {"type": "array", "items": {
            "type": "object", "required": ["id", "needed_by", "reason"],
            "properties": {"id": {"type": "string"}, "needed_by": {"type": "string"}, "reason": {"type": "string"}},
        }},
        "sampled": {"type": "object", "additionalProperties": {"type": "integer", "minimum": -1}},  # -1: rule 0
        "finished": {"type": "array", "items": {
            "type": "object", "required": ["id", "reason"],
            "properties": {"id": {"type": "string"}, "reason": {"type": "string"}},
        }},
        "waiting": _IDS,  # after the step, queue order
        "running": _IDS,  # after the step, admission order
        "kv": {  # after the step
            "type": "object", "required": ["num_free", "usage", "tables", "num_tokens", "cached", "free"],
            "properties": {
                "num_free": _INT,
                "usage": {"type": "number", "minimum": 0, "maximum": 1},
                "tables": {"type": "object", "additionalProperties": _BLOCKS},  # sample -> block ids
                # fast: slots its table covers; ref: live tokens of the row (0 once finished)
                "num_tokens": {"type": "object", "additionalProperties": _INT},
                "cached": _BLOCKS,  # blocks holding a prefix-cache key (used or free)
                "free": _BLOCKS,  # free blocks (fast: next to be reused first; ref: ascending)
            },
        },
        "block_changes": {"type": "object", "additionalProperties": {
            "type": "object",
            "properties": {"added": _BLOCKS, "freed": _BLOCKS, "replaced": _BLOCKS},
        }},
        "prefix_cache": {"oneOf": [{"type": "null"}, {
            "type": "object",
            "required": ["queries", "hits", "blocks_evicted", "blocks_reused", "blocks_allocated"],
            "properties": {k: _INT for k in ("queries", "hits", "blocks_evicted", "blocks_reused", "blocks_allocated")},
        }]},
        "block_reuse_rate": {  # blocks from the prefix cache / blocks placed in tables
            "type": "object", "required": ["step", "cumulative"],
            "properties": {"step": {"type": ["number", "null"]}, "cumulative": {"type": ["number", "null"]}},
        },
        "totals": {  # cumulative; fast: equal to LLMEngine.get_metrics() after the step
            "type": "object",
            "required": ["generated_tokens", "prompt_tokens_computed", "preemptions"],
            "properties": {"generated_tokens": _INT, "prompt_tokens_computed": _INT, "preemptions": _INT,
                           "prefix_hit_tokens": _INT, "prefix_query_tokens": _INT,
                           "prefix_cache_hit_rate": {"type": "number"}},
        },
    },
}
