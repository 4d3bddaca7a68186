"""Adapters that misbehave, for tests/test_conformance_isolation.py: `--engine tests.bad_adapters:NAME`.

Each wraps the real `fast` adapter and breaks one promise: it hangs, ends its process, returns the
wrong outputs, or tampers with the suite's own code (which, in the engine process, is a copy the
verdict never uses).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from conformance.adapters import FastAdapter


class BadAdapter(FastAdapter):
    """`fast`, except that `generate` does `misbehave(outputs)` (default: return them)."""

    name = "bad"

    def generate(self, prompts, params):
        return self.misbehave(super().generate(prompts, params))

    def misbehave(self, outs):
        return outs


def _adapter(misbehave):
    def factory(model_dir, **options):
        adapter = BadAdapter(model_dir, **options)
        adapter.misbehave = misbehave
        return adapter

    return factory


def _hang(outs):
    while True:
        time.sleep(3600)


def _exit(outs):
    sys.exit(3)


def _interrupt(outs):
    raise KeyboardInterrupt


def _segfault(outs):
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def _sigkill(outs):  # what the kernel's OOM killer does
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


class _LooksLikeAnOutput:
    """Has `.outputs` (so a check that only iterates would accept it) but is no RequestOutput."""

    def __init__(self, out):
        self.request_id, self.outputs = out.request_id, out.outputs


hangs = _adapter(_hang)
exits = _adapter(_exit)
interrupts = _adapter(_interrupt)
segfaults = _adapter(_segfault)
killed = _adapter(_sigkill)
returns_nothing = _adapter(lambda outs: [])
returns_none = _adapter(lambda outs: None)
too_few = _adapter(lambda outs: outs[:-1])
too_many = _adapter(lambda outs: outs + outs[-1:])
wrong_types = _adapter(lambda outs: [_LooksLikeAnOutput(o) for o in outs])
reversed_order = _adapter(lambda outs: outs[::-1] if len(outs) > 1 else outs)


def hangs_while_loading(model_dir, **options):
    time.sleep(3600)


def patches_the_comparison(model_dir, **options):
    """Wrong logits, and every comparison function of the suite patched to pass."""
    import torch

    import conformance.compare
    import conformance.tiers

    def always_close(*args, **kwargs):
        return None

    for module in (conformance.compare, conformance.tiers):
        module.assert_close = always_close
        module.check_request_outputs = always_close
    adapter = FastAdapter(model_dir, **options)
    adapter.model_logits = lambda token_ids: torch.zeros(len(token_ids), 512)
    return adapter


def patches_the_runner(model_dir, **options):
    """Outputs of another request, and the runner's `given` patched so no example ever runs."""
    import conformance.runner

    def given_nothing(strategy):
        return lambda fn: (lambda: None)

    conformance.runner.given = given_nothing
    return too_many(model_dir, **options)


def _send_on_encode(make_reduction):
    """Patch the engine process's encoder so that `generate`'s outputs go out as `make_reduction()`."""

    def factory(model_dir, **options):
        import conformance.isolation as iso

        original = iso._Encoder.reducer_override

        def reducer_override(self, obj):
            if obj is os.system:
                return NotImplemented  # pickled by name: `posix.system`
            if type(obj).__name__ == "RequestOutput":  # what `generate` returns
                return make_reduction()
            return original(self, obj)

        iso._Encoder.reducer_override = reducer_override
        return FastAdapter(model_dir, **options)

    return factory


def _touch_marker():
    return os.system, (f"touch {os.environ.get('BAD_ADAPTER_MARKER', '/tmp/pagedlm-bad-adapter-ran-code')}",)


# A pickle that would run `os.system` in a process that unpickles it.
sends_code = _send_on_encode(_touch_marker)
# A pickle whose REDUCE calls a handle (a proxy of an engine object) while the suite decodes it.
sends_a_call = _send_on_encode(lambda: (len, ([1, 2],)))


def _without_constraints(params):
    from ref.sampling_params import SamplingParams

    strip = lambda p: SamplingParams(**{**p.__dict__, "structured_outputs": None})  # noqa: E731
    return [strip(p) for p in params] if isinstance(params, list) else strip(params)


class _IgnoresConstraints(FastAdapter):
    """`fast`, except that it drops every request's `structured_outputs` (and runs the rest)."""

    name = "ignores-constraints"

    def generate(self, prompts, params):
        return super().generate(prompts, _without_constraints(params))


def ignores_constraints(model_dir, **options):
    return _IgnoresConstraints(model_dir, **options)
