"""The planted-bug catalogue: realistic single defects in `fast`, each of which the suite must
catch with a message that names what broke.

Each entry is a source diff (tests/planting.py applies it to this process's `fast`, or to the
contract code `fast` shares with `ref/`), the check that must fail, and a text its message must
contain. The defects are the kind a person makes — an off-by-one, a wrong boundary, a swapped
order, a shared generator, a skipped copy — in every tier and every SPEC section: the sampler,
the model runner and the scheduler/worker boundary, the model, the scheduler's policy, the
allocator and the block pool, both attention backends (the Triton kernels included, run by the
interpreter on CPU), seeds, the request lifecycle and the limits.

A defect the suite misses is listed in BLIND with the reason: a strict xfail, so the day a
check learns to catch it the test flips and the entry must move to CATALOGUE. A defect caught on
some of Hypothesis's draws only is listed in RARE (not run: its outcome would flip with the draws).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conformance.adapters import FastAdapter
from conformance.runner import run_check
from conformance.tiers import CHECKS, MAX_MODEL_LEN, TIERS, Context, Profile
from tests.planting import plant

PROFILE = Profile("catalogue", examples=12, max_requests=10, stateful_steps=30, families=False, kernel_max_seq_len=64)


@dataclass(frozen=True)
class Bug:
    id: str
    module: str
    old: str
    new: str
    check: str  # "tier/check"
    match: str  # text the failure message must contain (case-insensitive); "a|b": either


CATALOGUE = [
    # ---------------------------------------------------------------- sampler
    # Sampler defects are judged by the sampler tier, which draws ten times the examples of a
    # profile for the cost of one e2e example; e2e workloads catch most of them too, but not on
    # every draw (a random model's logits seldom sit where a boundary matters).
    Bug("temperature-applied-twice", "fast.worker.sampler",
        "logits = logits / torch.tensor([p.temperature for p in params])[:, None]",
        "logits = logits / torch.tensor([p.temperature ** 2 for p in params])[:, None]",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("top-k-keeps-one-extra", "fast.worker.sampler",
        "kth = torch.topk(logits, max(top_k), dim=-1).values.gather(1, kth_index)",
        "kth = torch.topk(logits, min(max(top_k) + 1, V), dim=-1).values.gather(1, (kth_index + 1).clamp(max=V - 1))",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("min-p-not-relative-to-the-top", "fast.worker.sampler",
        "drop = (probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)[:, None]",
        "drop = (probs < min_p[:, None]) & (min_p > 0)[:, None]",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("top-p-drops-the-crossing-token", "fast.worker.sampler",
        "mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs",
        "mass_before = torch.cumsum(sorted_probs, dim=-1)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("presence-penalty-counts-the-prompt", "fast.worker.sampler",
        "x = x - pres * seen_out.float()", "x = x - pres * (seen_out | seen_prompt).float()",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("frequency-penalty-sign", "fast.worker.sampler",
        "x = x - freq * out_counts", "x = x + freq * out_counts",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("repetition-penalty-ignores-the-prompt", "fast.worker.sampler",
        "x = torch.where(seen_out | seen_prompt, penalized, x)", "x = torch.where(seen_out, penalized, x)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("one-generator-for-the-batch", "fast.worker.sampler",
        "noise[j].exponential_(generator=r.generator)", "noise[j].exponential_(generator=rows[0].generator)",
        "sampler/edges_vs_oracle", "sampler row"),
    # End-to-end workloads on a random model seldom reach these two (a seen token with a negative
    # logit near the top; EOS as the favourite within min_tokens): the sampler tier builds such
    # logits on purpose (conformance/sampling.py).
    Bug("repetition-penalty-divides-negative-logits", "fast.worker.sampler",
        "penalized = torch.where(x > 0, x / rep, x * rep)", "penalized = x / rep",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("min-tokens-forgets-eos", "fast.worker.sampler",
        "stop = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))",
        "stop = list(p.stop_token_ids)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("logprobs-of-processed-logits", "fast.worker.sampler",
        "entries, sampled_lp = self._logprobs(raw, rows, token_list)",
        "entries, sampled_lp = self._logprobs(logits, rows, token_list)",
        "e2e/workloads_vs_oracle", "logprob"),
    Bug("greedy-ignores-penalties", "fast.worker.sampler",
        "tokens = torch.argmax(logits, dim=-1)  # greedy rows keep this",
        "tokens = torch.argmax(raw, dim=-1)  # greedy rows keep this",
        "sampler/edges_vs_oracle", "sampler row"),
    # ---------------------------------------------------------------- model runner
    # (A uniform shift of every position is invisible under RoPE, which sees only differences.)
    Bug("positions-restart-each-chunk", "fast.worker.model_runner",
        "positions += range(start, end)", "positions += range(0, end - start)",
        "e2e/workloads_vs_oracle", "request"),
    Bug("samples-from-the-first-row-of-a-chunk", "fast.worker.model_runner",
        "sample_rows.append(len(ids) - 1)", "sample_rows.append(len(ids) - (end - start))",
        "e2e/workloads_vs_oracle", "request"),
    Bug("fork-skips-the-partial-block-copy", "fast.worker.model_runner",
        "        if not copies:\n            return\n", "        return\n",
        "e2e/workloads_vs_oracle", "request"),
    # ---------------------------------------------------------------- model
    Bug("silu-on-the-wrong-half", "fast.worker.model",
        "act = F.silu(gate_up[:, : layer.inter]).mul_(gate_up[:, layer.inter:])",
        "act = F.silu(gate_up[:, layer.inter:]).mul_(gate_up[:, : layer.inter])",
        "model/logits_vs_transformers", "logits"),
    Bug("rope-sin-sign", "fast.worker.model",
        "q = q * cos + rotate_half(q) * sin  # [N, Hq, D]", "q = q * cos - rotate_half(q) * sin  # [N, Hq, D]",
        "model/logits_vs_transformers", "logits"),
    Bug("no-final-norm", "fast.worker.model",
        "return rms_norm(x, self.final_norm, self.eps)", "return x",
        "model/logits_vs_transformers", "logits"),
    Bug("attention-scale-sqrt-missing", "fast.worker.model",
        "self.scale = config.head_dim ** -0.5", "self.scale = config.head_dim ** -1.0",
        "model/logits_vs_transformers", "logits"),
    # ---------------------------------------------------------------- engine bookkeeping
    Bug("prompt-logprobs-score-the-same-token", "fast.worker.model_runner",
        "logprob_entry(lp[j], st.token_at(p + 1), top[j])", "logprob_entry(lp[j], st.token_at(p), top[j])",
        "e2e/workloads_vs_oracle", "prompt"),
    Bug("cumulative-logprob-not-summed", "fast.core.scheduler",
        "r.cumulative_logprob += entry[token].logprob", "r.cumulative_logprob = entry[token].logprob",
        "e2e/workloads_vs_oracle", "cumulative"),
    Bug("forked-children-skip-their-first-sample", "fast.worker.model_runner",
        "for sampler in (st, *children.get(req_id, ())):", "for sampler in (st,):",
        "e2e/workloads_vs_oracle", "query_len"),
    # ---------------------------------------------------------------- request checks (SPEC §4)
    Bug("n-checked-against-twice-max-n", "ref.inputs",
        "if params.n > limits.max_n:", "if params.n > 2 * limits.max_n:",
        "robustness/bad_requests_rejected", "bad n"),
    Bug("surrogates-reach-the-tokenizer", "ref.inputs",
        'prompt.encode("utf-8")', 'prompt.encode("utf-8", "surrogatepass")',
        "robustness/bad_requests_rejected", "bad prompt"),
    Bug("abort-leaves-queued-samples", "fast.engine.llm_engine",
        "            self.scheduler.remove_all(queued)\n", "            self.scheduler.remove_all(queued[:1])\n",
        "robustness/abort_frees_everything", "free every block|query_len|never told to drop|already has blocks"),
    # ---------------------------------------------------------------- scheduler -> worker boundary
    # The workers keep their own copy of each sample, synced one way by SchedulerOutput.
    Bug("runner-appends-blocks-after-preemption", "fast.worker.model_runner",  # `resumed` ignored
        "        if cached.resumed:\n            st.block_ids = list(cached.block_ids)\n"
        "        else:\n            st.block_ids += cached.block_ids\n",
        "        st.block_ids += cached.block_ids\n",
        "e2e/workloads_vs_oracle", "request"),
    Bug("sync-cursor-not-advanced", "fast.core.scheduler",  # every step resends the tokens since admission
        "r.num_synced_tokens, r.num_synced_blocks = r.num_tokens, r.num_synced_blocks + len(new_blocks)",
        "r.num_synced_blocks = r.num_synced_blocks + len(new_blocks)",
        "e2e/workloads_vs_oracle", "query_len"),
    Bug("preempted-sample-restarts-its-generator", "fast.core.scheduler",  # resent as new: fresh generator
        "request.num_synced_blocks = 0  # the workers' table is void; it gets a whole new one",
        "request.known_to_workers = False  # the workers' state is void; send it anew",
        # a token that differs, prompt logprobs scored twice, or the workers' stale state left behind
        "e2e/workloads_vs_oracle", "request|never told to drop"),
    Bug("block-copies-before-the-forward", "fast.worker.model_runner",  # copies a partial block not yet written
        "        inputs = self.prepare(scheduler_output)\n"
        "        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.slot_mapping,\n"
        "                            inputs.metadata, self.backend)\n"
        "        self.copy_blocks(scheduler_output.block_copies)  # the parents' KV is written now\n",
        "        self.copy_blocks(scheduler_output.block_copies)\n"
        "        inputs = self.prepare(scheduler_output)\n"
        "        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.slot_mapping,\n"
        "                            inputs.metadata, self.backend)\n",
        "e2e/workloads_vs_oracle", "sample 1: token"),
    Bug("slot-forgets-the-block-size", "fast.worker.model_runner",
        "slots += [st.block_ids[p // bs] * bs + p % bs for p in range(start, end)]",
        "slots += [st.block_ids[p // bs] + p % bs for p in range(start, end)]",
        "e2e/workloads_vs_oracle", "differs"),
    # ---------------------------------------------------------------- model
    Bug("residual-added-to-the-normed-input", "fast.worker.model",
        "x = x + layer.o_proj(attn.reshape(n, layer.q_size))", "x = h + layer.o_proj(attn.reshape(n, layer.q_size))",
        "model/logits_vs_transformers", "logits"),
    # ---------------------------------------------------------------- scheduler policy (SPEC §10)
    Bug("fork-computed-tokens-off-by-one", "fast.core.scheduler",
        "child.num_computed_tokens = s.start + s.num_new_tokens",
        "child.num_computed_tokens = s.start + s.num_new_tokens - 1",
        "scheduler/state_machine", "computed, the policy has"),
    Bug("preempted-requeued-at-the-tail", "fast.core.scheduler",
        "self.waiting.appendleft(request)", "self.waiting.append(request)",
        "scheduler/state_machine", "re-enter at the head"),
    # ---------------------------------------------------------------- allocator and block pool
    Bug("free-queues-head-blocks-first", "fast.core.kv_cache_manager",  # eviction order: tail blocks go first
        "self._pool.free_blocks(reversed(req.blocks))", "self._pool.free_blocks(req.blocks)",
        "allocator/state_machine", "free queue"),
    Bug("hit-blocks-touched-after-popping", "fast.core.kv_cache_manager",  # a free hit block gets evicted
        "        self._pool.touch(hit.blocks)  # before popping, so a free hit block cannot be evicted\n"
        "        new_blocks = self._pool.get_new_blocks(num_new_blocks)\n",
        "        new_blocks = self._pool.get_new_blocks(num_new_blocks)\n"
        "        self._pool.touch(hit.blocks)\n",
        "allocator/state_machine", "a block twice"),
    Bug("chain-compared-by-hash-only", "fast.core.block_pool",  # a hash collision becomes a hit
        "            if (mine.block_hash, mine.token_ids, mine.extra_keys) != (\n"
        "                theirs.block_hash, theirs.token_ids, theirs.extra_keys\n"
        "            ):\n",
        "            if mine.block_hash != theirs.block_hash:\n",
        "allocator/state_machine", "hit blocks"),
    Bug("partly-filled-block-cached", "fast.core.kv_cache_manager",
        "for index in range(len(req.block_keys), num_computed_tokens // self.block_size):",
        "for index in range(len(req.block_keys), cdiv(num_computed_tokens, self.block_size)):",
        "allocator/state_machine", "not full"),
    Bug("fork-shares-the-partial-block", "fast.core.kv_cache_manager",
        "num_full = parent.num_tokens // self.block_size", "num_full = cdiv(parent.num_tokens, self.block_size)",
        "allocator/state_machine", "fork returned"),
    # ---------------------------------------------------------------- attention: torch backend
    # (Its prefill-chunk path also serves the C++ 'cpu' backend: whichever runs first names it.)
    Bug("torch-decode-gqa-heads-interleaved", "fast.attention.torch_backend",  # head h reads kv head h % Hkv
        "q_dec = q[decode.query_rows].view(batch, num_kv_heads, group, head_dim)",
        "q_dec = q[decode.query_rows].view(batch, group, num_kv_heads, head_dim).transpose(1, 2)",
        "kernel/paged_vs_dense", "failed on torch"),
    Bug("decode-mask-sees-one-slot-past-the-context", "fast.attention.metadata",
        "key_mask=(key_pos[None, :] < decode_lens[:, None])", "key_mask=(key_pos[None, :] <= decode_lens[:, None])",
        "kernel/paged_vs_dense", "failed on torch"),
    Bug("torch-chunk-causal-mask-top-left", "fast.attention.torch_backend",  # a chunk over cached context
        "query_pos = key_pos[chunk.seq_len - query_len :, None]", "query_pos = key_pos[:query_len, None]",
        "kernel/paged_vs_dense", "kernel case 'mixed: chunk over cached context"),
    Bug("torch-chunk-window-one-too-wide", "fast.attention.torch_backend",
        "visible &= key_pos[None, :] > query_pos - sliding_window",
        "visible &= key_pos[None, :] >= query_pos - sliding_window",
        "kernel/paged_vs_dense", "kernel case 'chunk and decode under a window"),
    # ---------------------------------------------------------------- attention: Triton backend
    Bug("triton-grid-forgets-the-kv-segments", "fast.attention.triton_backend",  # launcher: split-KV
        "            num_kv_heads * launch.num_segments,\n", "            num_kv_heads,\n",
        "kernel/paged_vs_dense", "failed on triton(num_kv_splits=2)"),
    Bug("triton-reduce-one-program-per-sequence", "fast.attention.triton_backend",  # launcher: split-KV reduce
        "_reduce_segments_kernel[(metadata.num_tokens, num_heads)]",
        "_reduce_segments_kernel[(metadata.num_seqs, num_heads)]",
        "kernel/paged_vs_dense", "failed on triton(num_kv_splits=2)"),
    Bug("triton-split-kv-drops-the-remainder-tiles", "fast.attention.triton_backend",  # kernel
        "tiles_per_segment = tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS)",
        "tiles_per_segment = (tile_hi - tile_lo) // NUM_SEGMENTS",
        "kernel/paged_vs_dense", "failed on triton(num_kv_splits=2)"),
    Bug("triton-softmax-sum-not-rescaled", "fast.attention.triton_backend",  # kernel: several tiles
        "l_i = l_i * alpha + tl.sum(p, axis=1)", "l_i = l_i + tl.sum(p, axis=1)",
        "kernel/paged_vs_dense", "failed on triton"),
    Bug("triton-gqa-heads-interleaved", "fast.attention.triton_backend",  # kernel
        "head = kv_head * GROUP + head_in_group", "head = head_in_group * NUM_KV_HEADS + kv_head",
        "kernel/paged_vs_dense", "failed on triton"),
    # ---------------------------------------------------------------- sampler edges and seeds
    Bug("top-k-ties-cut-by-index", "fast.worker.sampler",  # keeps exactly k: drops tokens tied with the k-th
        "            kth = torch.topk(logits, max(top_k), dim=-1).values.gather(1, kth_index)\n"
        "            mask = (logits < kth) & torch.tensor([k > 0 for k in top_k])[:, None]\n",
        "            order = torch.sort(logits, dim=-1, descending=True, stable=True).indices\n"
        "            rank = torch.empty_like(order).scatter_(1, order, torch.arange(V).expand_as(order).contiguous())\n"
        "            mask = (rank > kth_index) & torch.tensor([k > 0 for k in top_k])[:, None]\n",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("min-p-drops-the-exact-cut", "fast.worker.sampler",
        "drop = (probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values)",
        "drop = (probs <= min_p[:, None] * probs.max(dim=-1, keepdim=True).values)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("min-p-relative-to-the-batch-max", "fast.worker.sampler",  # a row's cut depends on the others
        "drop = (probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)[:, None]",
        "drop = (probs < min_p[:, None] * probs.max()) & (min_p > 0)[:, None]",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("decode-mask-reaches-the-longest-context", "fast.attention.metadata",  # right alone, wrong batched
        "key_mask=(key_pos[None, :] < decode_lens[:, None])", "key_mask=(key_pos[None, :] < max_seq_len)",
        "kernel/paged_vs_dense", "failed on torch"),
    Bug("base-seed-from-a-fresh-generator", "fast.engine.llm_engine",
        "base_seed = draw_base_seed(self._seed_gen)",
        "base_seed = draw_base_seed(torch.Generator().manual_seed(self.config.seed))",
        "determinism/unseeded_requests_differ", "share one random stream"),
    # ---------------------------------------------------------------- stop rules and limits (SPEC §5)
    # The oracle's stop rules (ref.sequence): fast has its own, incremental ones, so
    # a defect in ref's shows as fast differing from the oracle, and in the output contract
    # (conformance/contract.py) on the oracle's outputs. Then fast's own (fast.core.detokenizer).
    Bug("length-checked-before-the-stop-rules", "ref.sequence",  # a stop on the last allowed token
        "    text = decode(output_ids)\n    if len(output_ids) >= p.min_tokens:\n",
        "    text = decode(output_ids)\n"
        "    if len(output_ids) >= (p.max_tokens or ctx.max_model_len) or prompt_len + len(output_ids) >= ctx.max_model_len:\n"
        "        return text, \"length\", None\n"
        "    if len(output_ids) >= p.min_tokens:\n",
        "e2e/stops_at_the_limit", "finish_reason='length'"),
    Bug("include-stop-str-inverted", "ref.sequence",
        "text = text[: pos + len(stop_str)] if p.include_stop_str_in_output else text[:pos]",
        "text = text[:pos] if p.include_stop_str_in_output else text[: pos + len(stop_str)]",
        "e2e/stops_at_the_limit", ", want '"),
    Bug("stop-string-searched-in-the-last-token-only", "ref.sequence",
        "hit = find_stop_string(text, p.stop)", "hit = find_stop_string(decode(output_ids[-1:]), p.stop)",
        "e2e/stops_at_the_limit", ", want '"),
    Bug("stop-search-starts-one-character-late", "fast.core.detokenizer",
        "start = max(0, changed - self._longest_stop + 1) if self._searched else 0",
        "start = max(0, changed - self._longest_stop + 2) if self._searched else 0",
        "e2e/stops_at_the_limit", "yet it went on|holds stop string|, want '"),
    Bug("stop-token-left-in-the-text", "fast.core.detokenizer",
        "                if p.include_stop_str_in_output:\n                    self._detok.append(token_id)\n",
        "                self._detok.append(token_id)\n",
        "e2e/stops_at_the_limit", ", want '"),
    Bug("one-token-past-max-model-len", "ref.sequence",
        "prompt_len + len(output_ids) >= ctx.max_model_len:", "prompt_len + len(output_ids) > ctx.max_model_len:",
        "e2e/workloads_vs_oracle", "max_model_len=128"),
    Bug("one-token-past-max-tokens", "ref.sequence",
        "if len(output_ids) >= max_tokens or", "if len(output_ids) > max_tokens or",
        "e2e/workloads_vs_oracle", "passes max_tokens"),
    Bug("prompt-of-max-model-len-rejected", "ref.inputs",
        "if len(ids) > limits.max_model_len:", "if len(ids) >= limits.max_model_len:",
        "e2e/workloads_vs_oracle", "max_model_len (128), got 128"),
    Bug("finished-ids-never-sent", "fast.core.scheduler",
        "            self._finished_req_ids.append(request.request_id)\n", "",
        "robustness/abort_frees_everything", "never told to drop"),
    Bug("abort-leaves-waiting-samples-queued", "fast.core.scheduler",
        "        kept = [r for r in self.waiting if id(r) not in doomed]\n"
        "        self.waiting.clear()\n"
        "        self.waiting.extend(kept)\n", "",
        "robustness/abort_frees_everything", "never told to drop|already has blocks"),
    Bug("unseeded-samples-use-the-global-rng", "fast.worker.model_runner",
        "generator = None if new.seed is None else torch.Generator().manual_seed(new.seed)",
        "generator = None if new.params.seed is None else torch.Generator().manual_seed(new.seed)",
        "determinism/same_seed_same_output", "differ"),
    Bug("min-tokens-counts-the-prompt", "ref.sequence",
        "    if len(output_ids) >= p.min_tokens:\n", "    if prompt_len + len(output_ids) >= p.min_tokens:\n",
        "e2e/stops_at_the_limit", "no stop token/string ends it"),
    Bug("finished-ids-dropped-after-new-requests", "fast.worker.model_runner",
        "        for req_id in out.finished_req_ids:\n            self.requests.pop(req_id, None)\n"
        "        for new in out.scheduled_new_reqs:\n            self.requests[new.req_id] = self._new_state(new)\n",
        "        for new in out.scheduled_new_reqs:\n            self.requests[new.req_id] = self._new_state(new)\n"
        "        for req_id in out.finished_req_ids:\n            self.requests.pop(req_id, None)\n",
        "robustness/abort_frees_everything", "KeyError"),
    # Random programs reach it about once in 300; the scheduler tier's scripted scenario every run.
    Bug("victim-budget-not-refunded", "fast.core.scheduler",
        "budget += self._unschedule(plan, victim)", "self._unschedule(plan, victim)",
        "scheduler/state_machine", "scripted scenario 'victim granted tokens this step gives them back'"),
    Bug("greedy-only-at-temperature-zero", "fast.worker.sampler",
        "random_rows = [i for i, r in enumerate(rows) if not r.params.greedy and i not in dead_rows]",
        "random_rows = [i for i, r in enumerate(rows) if r.params.temperature > 0 and i not in dead_rows]",
        "sampler/edges_vs_oracle", "exact tie"),
    # ---------------------------------------------------------------- structured output and token controls (SPEC §6)
    # Caught since compare.py recomputes the oracle's decision with its token controls (before,
    # the banned token was the oracle's unmasked best and the divergence passed as a near-tie).
    Bug("bad-words-only-for-greedy", "fast.worker.sampler",
        "banned = _banned_by_bad_words(r.bad_words_token_ids, r.output_ids)",
        "banned = _banned_by_bad_words(r.bad_words_token_ids, r.output_ids) if p.greedy else []",
        "structured/constraints_vs_oracle", "differs"),
    # The bitmask's rows follow the scheduler's list of constrained samples (forked children
    # last); the worker's sampling rows put each child after its parent.
    Bug("grammar-bitmask-rows-taken-in-order", "fast.worker.sampler",
        "allowed = unpack_bitmask(grammar.bitmask[[grammar.row_of[i] for i in constrained]], V)",
        "allowed = unpack_bitmask(grammar.bitmask[: len(constrained)], V)",
        "structured/constraints_vs_oracle", "finish_reason 'abort'|differs"),
    Bug("forked-children-sample-unmasked", "fast.core.scheduler",  # their first token sees no bitmask
        "return done + [child for _, child in plan.forked]", "return done",
        "structured/constraints_vs_oracle", "sample 1: finish_reason 'abort'"),
    Bug("grammar-skips-the-first-token", "fast.core.request",  # "the prefill's token is not the grammar's"
        "if self.grammar is not None and not self.grammar.accept_token(token_id):",
        "if self.grammar is not None and self.num_output_tokens > 0 and not self.grammar.accept_token(token_id):",
        "structured/constraints_vs_oracle", "token 1 differs"),
    Bug("grammar-refed-on-preemption", "fast.core.scheduler",  # recompute replays the output into the matcher
        "        request.num_computed_tokens = 0\n",
        "        request.num_computed_tokens = 0\n"
        "        if request.grammar is not None:\n"
        "            for token in request.output_token_ids:\n"
        "                request.grammar.accept_token(token)\n",
        "structured/constraints_vs_oracle", "differs|finish_reason 'abort'"),
    Bug("ended-grammar-allows-everything", "fast.core.structured_output",  # xgrammar's allocate: all ones
        "bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)",
        "bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)",
        "structured/constraints_vs_oracle", "finish_reason 'abort'"),
    Bug("rule-0-row-samples-token-0", "fast.worker.sampler",  # argmax of an all -inf row
        "        for i in dead_rows:\n            token_list[i] = NO_TOKEN\n", "",
        "structured/constraints_vs_oracle", "finish_reason 'abort'|differs"),
    Bug("bad-words-match-the-prompt", "fast.worker.sampler",
        "banned = _banned_by_bad_words(r.bad_words_token_ids, r.output_ids)",
        "banned = _banned_by_bad_words(r.bad_words_token_ids, r.prompt_ids + r.output_ids)",
        "structured/constraints_vs_oracle", "request 7 sample 0: token 0 differs"),
    Bug("logit-bias-after-penalties", "fast.worker.sampler",
        "        if masked:\n            logits = self._apply_masks(logits, rows, grammar)\n"
        "        logits = self._apply_min_tokens(logits, rows)\n        logits = self._apply_penalties(logits, rows)\n",
        "        logits = self._apply_penalties(logits, rows)\n"
        "        if masked:\n            logits = self._apply_masks(logits, rows, grammar)\n"
        "        logits = self._apply_min_tokens(logits, rows)\n",
        "structured/constraints_vs_oracle", "request 8 sample 0: token 0 differs"),
    # In the code both engines share (ref/structured.py), so only the independent validators see it.
    Bug("json-whitespace-flag-inverted", "ref.structured",
        "any_ws = not so.disable_any_whitespace", "any_ws = so.disable_any_whitespace",
        "structured/constraints_vs_oracle", "outside a string"),
    Bug("allowed-token-ids-only-for-greedy", "fast.worker.sampler",
        "if p.allowed_token_ids is not None:", "if p.allowed_token_ids is not None and p.greedy:",
        "structured/constraints_vs_oracle", "request 9 sample 0: token 0 differs"),
]

# Defects the suite does not catch yet, and why (numbers from the catalogue's own runs).
BLIND: list[tuple[Bug, str]] = [
]

# Defects a check catches on some of Hypothesis's draws only, at this profile: not run as tests
# (caught or not, a strict xfail would flip with the draws, and the draws depend even on which
# modules the process imported before: Hypothesis mines constants from loaded local modules).
# Kept for the record, with what it takes to catch each.
RARE: list[tuple[Bug, str]] = [
    (Bug("prompt-logprobs-rescored-after-preemption", "fast.worker.model_runner",
         "first = max(st.num_prompt_logprobs, start)", "first = start",
         "e2e/workloads_vs_oracle", "prompt_logprobs must have one entry per prompt token"),
     "Needs a request with prompt_logprobs preempted after its prompt was (partly) scored: caught "
     "after two of three import histories (16-22 s), missed after the third (146 s). A targeted e2e "
     "case (a prompt_logprobs request in a pool that forces its preemption) would catch it always."),
    # The scheduler state machine runs 12 examples of 30 steps at this profile (about 1 s): each of
    # these needs a rarer draw; all are caught with 1000 examples of 50 steps (20-65 s), two of them
    # already with 100. A scripted scenario each (as for the refund) would catch them every run.
    (Bug("unchunked-prompt-filling-the-budget-refused", "fast.core.scheduler",
         "if not self.config.enable_chunked_prefill and num_remaining > budget:",
         "if not self.config.enable_chunked_prefill and num_remaining >= budget:",
         "scheduler/state_machine", "the policy"),
     "Needs chunked prefill off and a waiting prompt exactly as long as the budget left (caught "
     "with 1000 examples, not with 100)."),
    (Bug("priority-victim-ties-by-admission", "fast.core.policy",
         "return max(running, key=lambda r: (r.priority, r.arrival))",
         "return max(running, key=lambda r: r.priority)",
         "scheduler/state_machine", "the policy"),
     "Needs a preemption under priority with the lowest priority tied among running requests "
     "(caught with 100 examples)."),
    (Bug("threshold-ignored-for-running-chunks", "fast.core.scheduler",
         "        if self.config.long_prefill_token_threshold:\n"
         "            num_new = min(num_new, self.config.long_prefill_token_threshold)\n"
         "        return num_new\n",
         "        return num_new\n",
         "scheduler/state_machine", "the policy"),
     "Needs long_prefill_token_threshold set and a running request with more than that left to "
     "compute (a chunked prompt, or a recompute after preemption; caught with 100 examples)."),
]


def run(check: str, model_dir: str):
    tier, name = check.split("/")
    chosen = next(c for c in CHECKS if c.tier == tier and c.name == name)
    make = lambda d, **o: FastAdapter(d, **o)  # noqa: E731
    ctx = Context(adapter=make(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=PROFILE,
                  make_adapter=make)
    return run_check(chosen, ctx, seed=1234, shrink=False, replay="")


def test_the_catalogue_is_large_and_distinct():
    ids = [b.id for b in CATALOGUE] + [b.id for b, _ in BLIND] + [b.id for b, _ in RARE]
    assert len(set(ids)) == len(ids)
    assert len(CATALOGUE) >= 40
    assert all(b.match for b in CATALOGUE), "every entry names what its failure message must say"
    assert {b.check.split("/")[0] for b in CATALOGUE} == set(TIERS), "every tier catches some entry"


@pytest.mark.parametrize("check", sorted({b.check for b in CATALOGUE}))
def test_the_clean_engine_passes_every_check_the_catalogue_uses(check, tiny_model_dir):
    """Else a planted bug could 'fail' a check for a reason of its own (e.g. a coverage minimum)."""
    result = run(check, tiny_model_dir)
    assert result.status == "passed", result.message[:2000]


@pytest.mark.parametrize("bug", CATALOGUE, ids=lambda b: b.id)
def test_planted_bug_is_caught(bug: Bug, tiny_model_dir, monkeypatch):
    plant(monkeypatch, bug.module, bug.old, bug.new)
    result = run(bug.check, tiny_model_dir)
    assert result.status == "failed", f"{bug.id}: {bug.check} {result.status} with the bug planted"
    message = result.message.lower()
    assert any(m.lower() in message for m in bug.match.split("|")), (
        f"{bug.id}: message does not name it:\n{result.message[:2000]}")


class NotCaught(Exception):
    """The check passed with the bug planted (the only failure a BLIND entry may have: a diff
    that no longer applies is an error, not an expected failure)."""


@pytest.mark.parametrize("bug,why", BLIND, ids=lambda x: x.id if isinstance(x, Bug) else "")
@pytest.mark.xfail(strict=True, raises=NotCaught, reason="a known blind spot of the suite (see BLIND)")
def test_known_blind_spot(bug: Bug, why: str, tiny_model_dir, monkeypatch):
    plant(monkeypatch, bug.module, bug.old, bug.new)
    result = run(bug.check, tiny_model_dir)
    if result.status != "failed":
        raise NotCaught(f"{bug.id}: {bug.check} {result.status}: {why}")
