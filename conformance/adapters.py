"""Engine adapters: how the suite drives an engine, ours or someone else's.

The protocol is vLLM's offline API: `generate(prompts, sampling_params) -> list[RequestOutput]`.
Everything else is an optional hook that unlocks a deeper tier; an adapter without it gets that
tier reported as "n/a", not as passed:

- `model_logits(token_ids) -> Tensor[T, vocab]`           tier model (teacher-forced logits)
- `attention_backends() -> dict[str, AttentionBackend]`    tier kernel
- `allocator_factory` (KVCacheConfig -> allocator)         tier allocator
- `scheduler_factory` ((SchedulerConfig, kv) -> scheduler) tier scheduler
- `sample(logits, rows, eos_token_ids) -> list[int]`       tier sampler (conformance/sampling.py)
- `make_engine(**options)` -> LLMEngine-like object        aborts, streaming, leak checks
- `kv_is_empty(engine) -> bool`                            robustness: aborts free everything

`--engine module:factory` names any callable `factory(model_dir, **options)` returning such an
object (or anything with `generate`).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from ref.outputs import CompletionOutput, Logprob, RequestOutput
from ref.sampling_params import SamplingParams

# Engine options every adapter receives; engines ignore what does not apply to them.
COMMON_OPTIONS = ("seed", "max_model_len")


class RefAdapter:
    name = "ref"

    def __init__(self, model_dir: str, **options: Any):
        from ref import LLM

        self.model_dir, self.options = model_dir, options
        self.llm = LLM(model_dir, **options)

    def generate(self, prompts, params):
        return self.llm.generate(prompts, params)

    def model_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.llm.llm_engine.model.teacher_forced_logits(token_ids)

    def make_engine(self, **options):
        from ref import EngineConfig, LLMEngine

        return LLMEngine(EngineConfig.from_options(self.model_dir, {**self.options, **options}))


class FastAdapter:
    name = "fast"

    def __init__(self, model_dir: str, **options: Any):
        from fast import LLM

        self.model_dir, self.options = model_dir, options
        self.llm = LLM(model_dir, **_with_policy_object(options))

    def generate(self, prompts, params):
        return self.llm.generate(prompts, params, use_tqdm=False)

    def model_logits(self, token_ids: list[int]) -> torch.Tensor:
        engine = self.llm.llm_engine
        return engine.executor.driver_call("teacher_forced_logits", (token_ids,))

    def attention_backends(self) -> dict:
        from fast.attention import get_backend

        backends = {"torch": get_backend("torch")}
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            try:
                backends["triton"] = get_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
            except Exception:  # triton missing on this platform: the tier reports what it ran
                pass
        if not torch.cuda.is_available():
            try:  # the C++ paged decode kernel, built on first use (no compiler: not run)
                backends["cpu"] = get_backend("cpu", "cpu")
            except Exception:  # noqa: BLE001
                pass
        return backends

    @property
    def allocator_factory(self):
        from fast.core.kv_cache_manager import KVCacheManager

        return KVCacheManager

    @property
    def scheduler_factory(self):
        from fast.core.scheduler import Scheduler

        return Scheduler

    def make_engine(self, **options):
        from fast import EngineConfig, LLMEngine

        return LLMEngine(EngineConfig.from_options(self.model_dir, _with_policy_object({**self.options, **options})))

    @staticmethod
    def sample(logits, rows, eos_token_ids) -> list[int]:
        from conformance.sampling import fast_sample

        return fast_sample(logits, rows, eos_token_ids)

    @staticmethod
    def kv_is_empty(engine) -> bool:
        """Every block free, and the workers hold no state of a finished sample beyond those
        they will be told to drop with the next step (raises naming them)."""
        engine.kv.check_invariants()
        held = set(engine.executor.driver_call("cached_request_ids"))
        leaked = held - set(engine.scheduler.pending_finished_req_ids) - set(engine.scheduler.requests)
        assert not leaked, (f"the workers still hold the state of finished samples "
                            f"{sorted(map(str, leaked))[:5]} and were never told to drop it")
        return engine.kv.num_free_blocks == engine.num_blocks


def _with_policy_object(options: dict) -> dict:
    """The options with a `policy` given as `module:attr` (`python -m conformance --policy`; it
    crosses to the engine process as a string) imported here, as the policy object fast takes."""
    policy = options.get("policy")
    if isinstance(policy, str) and ":" in policy:
        from fast.core.policy import load_policy

        return {**options, "policy": load_policy(policy)}
    return options


class FastTP2Adapter(FastAdapter):
    """fast with tensor_parallel_size=2: the model split over two worker processes (`mp`
    executor, torch.distributed: gloo on CPU, NCCL on CUDA); the scheduler, allocator and sampler
    hooks are fast's (they do not depend on the split), `model_logits` gathers over the ranks.
    Every engine it builds (`make_engine`) is TP=2 too; building one shuts the previous one down
    (the suite drives one at a time), so worker processes do not pile up until collected."""

    name = "fast-tp2"
    TENSOR_PARALLEL_SIZE = 2

    def __init__(self, model_dir: str, **options: Any):
        super().__init__(model_dir, **{"tensor_parallel_size": self.TENSOR_PARALLEL_SIZE, **options})
        self._made = None

    def make_engine(self, **options):
        if self._made is not None:
            self._made.shutdown()
        self._made = super().make_engine(**options)
        return self._made

    def shutdown(self) -> None:
        if self._made is not None:
            self._made.shutdown()
        self.llm.shutdown()


class HFAdapter:
    """transformers `generate`, one request at a time (batch of one, so no padding effects).
    SamplingParams it cannot express raise NotImplementedError naming the field."""

    name = "hf"

    def __init__(self, model_dir: str, seed: int = 0, max_model_len: int | None = None, **_: Any):
        from transformers import AutoModelForCausalLM

        from ref.tokenizer import TextCodec, load_tokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.codec = TextCodec(load_tokenizer(model_dir))
        self.seed = seed
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        # Unseeded requests draw their seed from here, one per request (as SPEC's engines do),
        # so that two identical unseeded requests do not sample identically.
        self._seeds = torch.Generator().manual_seed(seed)
        eos = self.model.config.eos_token_id
        self.eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])

    def _cap(self, max_new_tokens: int, ids: list[int]) -> int:
        """SPEC §5.3: generation stops once prompt + output reaches max_model_len (a prompt of
        exactly max_model_len still yields one token); transformers knows no such limit."""
        return max(1, min(max_new_tokens, self.max_model_len - len(ids)))

    def _seed_of(self, p: SamplingParams) -> int:
        return p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seeds))

    def model_logits(self, token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([token_ids])).logits[0].float()

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.codec.encode(prompt)
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])

    UNSUPPORTED = (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("include_stop_str_in_output", False),
                   ("allowed_token_ids", None), ("bad_words", None), ("logit_bias", None),
                   ("truncate_prompt_tokens", None), ("structured_outputs", None))

    def unsupported(self, p: SamplingParams) -> str | None:
        """Why this engine cannot run `p` (the suite then leaves such requests out), or None."""
        for field, default in self.UNSUPPORTED:
            if getattr(p, field) != default:
                return f"{self.name} cannot express {field}={getattr(p, field)!r}"
        return None

    @staticmethod
    def comparable(p: SamplingParams) -> bool:
        """Only greedy outputs can equal the oracle's token for token: transformers samples from
        its own RNG stream (torch.multinomial), not SPEC §6's per-request exponential race."""
        return p.greedy

    def _gen_kwargs(self, p: SamplingParams) -> dict:
        reason = self.unsupported(p)
        if reason:
            raise NotImplementedError(reason)
        stop_ids = ([] if p.ignore_eos else self.eos_ids) + list(p.stop_token_ids)
        kw = dict(max_new_tokens=p.max_tokens or 256, min_new_tokens=p.min_tokens or None,
                  do_sample=not p.greedy, num_return_sequences=p.n, repetition_penalty=p.repetition_penalty,
                  eos_token_id=stop_ids or None, pad_token_id=0)
        if not p.greedy:
            kw.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else None,
                      min_p=p.min_p or None)
        if p.stop:
            kw.update(stop_strings=p.stop, tokenizer=self.codec.tokenizer)
        return kw

    def generate(self, prompts, params):
        from ref.inputs import normalize_batch

        batch = normalize_batch(prompts, params)
        outs = []
        for i, (prompt, p) in enumerate(batch):
            text, ids = self._prompt_ids(prompt)
            outs.append(self._generate_one(str(i), text, ids, p))
        return outs

    @torch.no_grad()
    def _generate_one(self, rid: str, text, ids: list[int], p: SamplingParams) -> RequestOutput:
        kw = self._gen_kwargs(p)
        kw["max_new_tokens"] = self._cap(kw["max_new_tokens"], ids)
        torch.manual_seed(self._seed_of(p))
        input_ids = torch.tensor([ids])
        res = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), output_logits=True,
                                  return_dict_in_generate=True, **kw)
        completions = []
        for j in range(p.n):
            gen = res.sequences[j, len(ids):].tolist()
            logits = [step[j] for step in res.logits]
            completions.append(self._completion(j, gen, logits, kw["eos_token_id"] or [], p))
        prompt_lp = self._prompt_logprobs(ids, p.prompt_logprobs) if p.prompt_logprobs is not None else None
        return RequestOutput(rid, text, ids, prompt_lp, completions, True)

    def _completion(self, index, gen, logits, stop_ids, p: SamplingParams) -> CompletionOutput:
        # HF pads finished rows with pad_token_id after the stop token: cut there.
        end = next((k + 1 for k, t in enumerate(gen) if t in stop_ids and k + 1 >= p.min_tokens), len(gen))
        gen = gen[:end]
        stopped = bool(gen) and gen[-1] in stop_ids and len(gen) >= p.min_tokens
        reason = "stop" if stopped else "length"
        stop_reason = gen[-1] if stopped and gen[-1] in p.stop_token_ids else None
        lps, cum = None, None
        if p.logprobs is not None:
            lps, cum = [], 0.0
            for tok, row in zip(gen, logits):
                lp = torch.log_softmax(row.float(), -1)
                top = torch.sort(lp, descending=True, stable=True).indices[: p.logprobs].tolist()
                rank = lambda t: 1 + int((lp > lp[t]).sum())  # noqa: E731
                lps.append({t: Logprob(float(lp[t]), rank(t), self.codec.token_text(t)) for t in [tok, *top]})
                cum += float(lp[tok])
        text_ids = gen[:-1] if reason == "stop" and gen and gen[-1] in stop_ids else gen
        text = self.codec.decode(text_ids, p.skip_special_tokens)
        if p.stop and not stopped:  # transformers stops at a stop string but keeps it: trim as SPEC §5
            from ref.sequence import find_stop_string

            hit = find_stop_string(text, p.stop)
            if hit is not None:
                text, reason, stop_reason = text[: hit[0]], "stop", hit[1]
        return CompletionOutput(index, text, gen, cum, lps, reason, stop_reason)

    def _prompt_logprobs(self, ids, k):
        lp = torch.log_softmax(self.model_logits(ids), -1)
        out = [None]
        for i in range(1, len(ids)):
            row = lp[i - 1]
            top = torch.sort(row, descending=True, stable=True).indices[:k].tolist()
            out.append({t: Logprob(float(row[t]), 1 + int((row > row[t]).sum()), self.codec.token_text(t))
                        for t in [ids[i], *top]})
        return out


class HFContinuousAdapter(HFAdapter):
    """transformers `generate_batch` (continuous batching over a paged cache). One call per group
    of requests with equal settings, since a generation config applies to the whole batch."""

    name = "hf-cb"

    def unsupported(self, p: SamplingParams) -> str | None:
        if p.logprobs is not None or p.prompt_logprobs is not None or p.stop or p.n > 1:
            return f"{self.name}: logprobs, prompt_logprobs, stop strings and n > 1 are not supported"
        return super().unsupported(p)

    def generate(self, prompts, params):
        from transformers import GenerationConfig

        from ref.inputs import normalize_batch

        batch = normalize_batch(prompts, params)
        prompt_ids = [self._prompt_ids(prompt) for prompt, _ in batch]
        groups: dict[tuple[str, int], list[int]] = {}  # equal settings, including the length cap
        for i, (_, p) in enumerate(batch):
            cap = self._cap(self._gen_kwargs(p)["max_new_tokens"], prompt_ids[i][1])
            groups.setdefault((repr(p), cap), []).append(i)
        outs: list[RequestOutput | None] = [None] * len(batch)
        for (_, cap), members in groups.items():
            p = batch[members[0]][1]
            kw = self._gen_kwargs(p)
            kw["max_new_tokens"] = cap
            kw.pop("num_return_sequences")
            kw["eos_token_id"] = kw["eos_token_id"] or -1
            torch.manual_seed(self._seed_of(p))
            prompts_ids = [prompt_ids[i] for i in members]
            ids_list = [ids for _, ids in prompts_ids]
            res = self.model.generate_batch(ids_list, generation_config=GenerationConfig(**kw), warmup=False,
                                            continuous_batching_config=hf_paged_cache_config(ids_list, kw["max_new_tokens"]))
            for k, i in enumerate(members):
                gen = list(res[f"req_{k}"].generated_tokens)
                text, ids = prompts_ids[k]
                comp = self._completion(0, gen, [None] * len(gen), [] if kw["eos_token_id"] == -1 else kw["eos_token_id"], p)
                outs[i] = RequestOutput(str(i), text, ids, None, [comp], True)
        return outs


ADAPTERS = {"ref": RefAdapter, "fast": FastAdapter, "fast-tp2": FastTP2Adapter, "hf": HFAdapter,
            "hf-cb": HFContinuousAdapter}


def check_engine_spec(spec: str) -> None:
    """Raises ValueError unless `spec` is a built-in name or `module:factory` (imports nothing)."""
    if spec not in ADAPTERS and ":" not in spec:
        raise ValueError(f"--engine must be one of {sorted(ADAPTERS)} or module:factory, got {spec!r}")


def load_adapter(spec: str, model_dir: str, **options: Any):
    """`spec` is a built-in name or `module:factory`."""
    check_engine_spec(spec)
    if spec in ADAPTERS:
        return ADAPTERS[spec](model_dir, **options)
    module, attr = spec.split(":", 1)
    factory = getattr(importlib.import_module(module), attr)
    adapter = factory(model_dir, **options)
    if not hasattr(adapter, "generate"):
        raise ValueError(f"{spec} returned {type(adapter).__name__}, which has no generate()")
    if not hasattr(adapter, "name"):
        adapter.name = spec
    return adapter


def hf_paged_cache_config(prompts: list[list[int]], max_new_tokens: int):
    """A paged cache sized for these requests: left alone, transformers sizes it from the
    machine's free memory (~15 GB on a 24 GB machine)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 16
    pages = sum(-(-(len(p) + max_new_tokens) // page) for p in prompts)
    return ContinuousBatchingConfig(page_size=page, num_blocks=max(pages, 1),
                                    max_batch_tokens=max(16, min(2048, sum(len(p) for p in prompts))))
