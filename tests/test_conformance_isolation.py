"""The suite cannot be fooled or hung by the engine it judges (issue #11).

Every adapter of tests/bad_adapters.py breaks one promise; each run goes through the CLI entry
on one cheap check with a small time budget, and must give a non-zero exit code and a report
that names the problem. (Run in the suite's own process, `--no-isolation`, most of these pass
or hang the suite: that is what the engine process prevents.)
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
CHEAP_CHECK = ["--check", "same_seed_same_output", "--no-shrink"]  # two adapters, generate, no oracle


def run_bad(tmp_path, name: str, *args: str, timeout: int = 60) -> tuple[int, dict, str]:
    report = tmp_path / f"{name}.json"
    code = main(["--engine", f"tests.bad_adapters:{name}", *(args or CHEAP_CHECK), "--timeout", str(timeout),
                 "--report", str(report)])
    doc = json.loads(report.read_text())
    return code, doc, "\n".join(c["message"] for c in doc["checks"])


@pytest.mark.parametrize("name, problem", [
    ("exits", "the engine raised SystemExit(3)"),
    ("interrupts", "the engine raised KeyboardInterrupt"),
    ("segfaults", "killed by SIGSEGV"),
    ("killed", "killed by SIGKILL (the kernel's out-of-memory killer"),
    ("returns_nothing", "generate returned 0 outputs for"),
    ("returns_none", "generate returned NoneType, not a list"),
    ("too_few", "outputs for"),
    ("too_many", "outputs for"),
    ("wrong_types", "not a RequestOutput"),
    ("reversed_order", "is not for request"),
])
def test_a_bad_engine_fails_the_check_and_the_report_says_why(tmp_path, name, problem):
    code, doc, message = run_bad(tmp_path, name)
    assert code == 1 and not doc["passed"], message
    assert [c["status"] for c in doc["checks"]] == ["failed"]
    assert problem in message, message
    assert "generate(" in message or "output" in message, message


def test_a_hanging_engine_times_out_naming_the_request_and_the_run_goes_on(tmp_path, capsys):
    code, doc, message = run_bad(tmp_path, "hangs", "--tier", "robustness", "--no-shrink", timeout=20)
    out = capsys.readouterr().out
    assert code == 1
    status = {c["check"]: c["status"] for c in doc["checks"]}
    assert status["bad_requests_rejected"] == "failed"
    assert status["abort_frees_everything"] == "passed"  # the next checks ran, in a fresh engine process
    first = doc["checks"][0]
    assert first["message"].startswith("timeout after 20 s, during BadAdapter.generate("), first["message"]
    assert "prompt_token_ids" in first["message"] and "SamplingParams(" in first["message"]
    assert 20 <= first["seconds"] < 60  # wall time of the check, the engine's share included
    assert "failed (timeout after 20 s)" in out


def test_an_engine_that_hangs_while_loading_times_out(tmp_path):
    code, doc, message = run_bad(tmp_path, "hangs_while_loading", timeout=8)
    assert code == 1
    assert message.startswith("timeout after 8 s, during engine process.load_adapter('tests.bad_adapters:"), message


def test_patching_the_comparison_in_the_engine_does_not_change_the_verdict(tmp_path, capfd):
    """The adapter replaces every comparison function of the suite by one that passes, and
    returns zero logits: the parent's comparison still runs, and fails."""
    code, doc, message = run_bad(tmp_path, "patches_the_comparison", "--check", "logits_vs_transformers",
                                 "--no-shrink")
    assert code == 1, message
    assert "teacher-forced logits vs transformers" in message, message
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err  # transformers' progress bars are off, in both processes


def test_patching_the_runner_in_the_engine_does_not_change_the_verdict(tmp_path):
    code, doc, message = run_bad(tmp_path, "patches_the_runner")
    assert code == 1 and doc["checks"][0]["examples"] >= 1
    assert "outputs for" in message, message


@pytest.mark.parametrize("name, problem", [("sends_code", "reference to posix.system, which is not data"),
                                           ("sends_a_call", "makes a call while it is decoded")])
def test_bytes_that_would_run_code_in_the_suite_are_refused(tmp_path, monkeypatch, name, problem):
    marker = tmp_path / "ran-code"
    monkeypatch.setenv("BAD_ADAPTER_MARKER", str(marker))
    code, doc, message = run_bad(tmp_path, name)
    assert code == 1
    assert "the engine sent undecodable data" in message and problem in message, message
    assert not marker.exists()


def test_the_safe_unpickler_admits_only_data():
    import io

    from conformance.isolation import Endpoint, SafeUnpickler

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    ep = Endpoint(None, is_parent=True)
    with pytest.raises(pickle.UnpicklingError, match="not data"):
        SafeUnpickler(io.BytesIO(pickle.dumps(Evil())), ep).load()
    data = {"a": [1, 2.5, "x", None, (True, b"z")], "s": {1, 2}}
    assert SafeUnpickler(io.BytesIO(pickle.dumps(data)), ep).load() == data


def test_help_does_not_import_torch():
    code = ("import sys\nfrom conformance.__main__ import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--timeout SECONDS" in proc.stdout and "--no-isolation" in proc.stdout


def test_ctrl_c_reports_the_finished_checks_and_exits_130(tmp_path):
    report = tmp_path / "interrupted.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "conformance", "--tier", "robustness", "--tier", "determinism",
                             "--report", str(report)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "[passed]" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "INTERRUPTED" in rest and "tier" in rest  # the table of what finished
    doc = json.loads(report.read_text())
    assert doc["interrupted"] and not doc["passed"] and len(doc["checks"]) >= 1


def _engine_processes_of(pid: int) -> list[int]:
    """The engine processes whose parent is `pid` (read from /proc: Linux only)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"_child_main" in cmdline:
                found.append(int(entry))
    return found


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_until_idle(pid: int, deadline: float) -> None:
    """Until the process has used CPU and then stopped using it for 3 s."""
    last, still_since = _cpu_ticks(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _cpu_ticks(pid)
        if now != last:
            last, still_since = now, time.monotonic()
        elif now > 0 and time.monotonic() - still_since > 3:
            return
    raise AssertionError("the engine process never settled into its hang")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_engine_process_dies_with_the_suite():
    """An outer timeout (CI, a mutation tool) that kills the suite must not leave a hung engine
    behind: in its own session, it would spin forever and hold the suite's stderr open."""
    suite = subprocess.Popen([sys.executable, "-m", "conformance", "--engine", "tests.bad_adapters:hangs",
                              *CHEAP_CHECK, "--timeout", "600"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        engines: list[int] = []
        while not engines and time.monotonic() < deadline and suite.poll() is None:
            time.sleep(0.5)
            engines = _engine_processes_of(suite.pid)
        assert engines, "the suite started no engine process"
        _wait_until_idle(engines[0], deadline)  # loaded, and now asleep inside the hanging generate
    finally:
        suite.kill()
        suite.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in engines) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in engines if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"engine process {left} outlived the suite"


@pytest.mark.parametrize("type_name, bases, builtin", [
    ("ImportError", ["ImportError", "Exception", "BaseException", "object"], Exception),
    ("EngineBug", ["EngineBug", "Exception", "BaseException", "object"], Exception),
    ("Weird", ["Weird", "object"], Exception),
    ("BadShape", ["BadShape", "ValueError", "Exception", "BaseException", "object"], ValueError),
])
def test_an_engine_exception_is_reraised_under_its_nearest_builtin(type_name, bases, builtin):
    """An exception whose nearest builtin base is Exception itself (an ImportError of the
    engine's code, a plain `class EngineBug(Exception)`) arrives with its message, not as a
    TypeError about the MRO of the class made for it."""
    from conformance.isolation import RemoteError, remote_exception

    err = remote_exception(type_name, bases, "the message", "the traceback")
    assert isinstance(err, RemoteError) and isinstance(err, builtin)
    assert type(err).__name__ == type_name and str(err) == "the message"
    assert err.remote_type == type_name and err.remote_traceback == "the traceback"


# ----------------------------------------------------------------------------- devices
# A tensor crosses with its device's (type, index) and is rebuilt there when the receiver has
# that device, else on CPU. There is no GPU here: a "cuda" record is written by hand (as the
# engine process on a GPU machine would send it), and the placement is faked where needed.


def _bytes_as_if_on(device: tuple, obj) -> bytes:
    """`obj` pickled as the engine process sends it, with every tensor's device record `device`."""
    import io

    import torch

    from conformance.isolation import _rebuild_tensor, _tensor_bytes

    class FromDevice(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, torch.Tensor):
                name, shape, raw, _ = _tensor_bytes(o)
                return _rebuild_tensor, (name, shape, raw, device)
            return NotImplemented

    buf = io.BytesIO()
    FromDevice(buf, protocol=5).dump(obj)
    return buf.getvalue()


def _decode_in_parent(raw: bytes):
    import io

    from conformance.isolation import Endpoint, SafeUnpickler

    return SafeUnpickler(io.BytesIO(raw), Endpoint(None, is_parent=True)).load()


def _send(obj, *, from_parent: bool):
    """`obj` through the wire in one direction: the sender's encoder, the receiver's decoder."""
    import io

    from conformance.isolation import Endpoint, SafeUnpickler, _Encoder, _TrustingUnpickler

    buf = io.BytesIO()
    _Encoder(buf, Endpoint(None, is_parent=from_parent)).dump(obj)
    decoder = _TrustingUnpickler if from_parent else SafeUnpickler
    return decoder(io.BytesIO(buf.getvalue()), Endpoint(None, is_parent=not from_parent)).load()


@pytest.mark.parametrize("from_parent", [False, True])
def test_tensors_and_devices_cross_by_value_with_their_device(from_parent):
    import torch

    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)[:, 1:]  # not contiguous
    got = _send({"t": t, "empty": torch.empty(0, 5, dtype=torch.int32), "device": torch.device("cuda", 1),
                 "cpu": torch.device("cpu"), "dtype": torch.bfloat16}, from_parent=from_parent)
    assert got["t"].device.type == "cpu" and got["t"].dtype == torch.float16 and torch.equal(got["t"], t)
    assert got["empty"].shape == (0, 5) and got["empty"].dtype == torch.int32
    assert got["device"] == torch.device("cuda", 1) and type(got["device"]) is torch.device  # not a Proxy
    assert got["cpu"] == torch.device("cpu") and got["dtype"] is torch.bfloat16


def test_a_cuda_tensor_arrives_on_cpu_where_there_is_no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = torch.randn(4, 3).to(torch.bfloat16)
    got = _decode_in_parent(_bytes_as_if_on(("cuda", 0), [t, torch.zeros(0, dtype=torch.int64)]))
    assert got[0].device == torch.device("cpu") and got[0].dtype == torch.bfloat16 and torch.equal(got[0], t)
    assert got[1].device == torch.device("cpu") and got[1].shape == (0,)


def test_a_tensor_is_rebuilt_on_the_senders_cuda_device_when_this_process_has_it(monkeypatch):
    import torch

    from conformance.isolation import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_device(("cuda", 1)) == torch.device("cuda", 1)
    assert local_device(("cuda", None)) == torch.device("cuda")
    assert local_device(("cuda", 2)) == torch.device("cpu")  # a GPU this process does not have
    assert local_device(("cpu", None)) == torch.device("cpu")
    assert local_device(("mps", 0)) == torch.device("cpu")  # another kind of device: CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(("cuda", 0)) == torch.device("cpu")


def test_the_rebuilt_tensor_is_moved_to_the_device_chosen_for_it(monkeypatch):
    """The non-CPU branch of the rebuild, on a real device that exists without a GPU: meta
    stands in for the CUDA device `local_device` would choose on a GPU machine."""
    import torch

    from conformance import isolation

    monkeypatch.setattr(isolation, "local_device",
                        lambda d: torch.device("meta") if d[0] == "cuda" else torch.device("cpu"))
    got = _decode_in_parent(_bytes_as_if_on(("cuda", 0), {"x": torch.ones(2, 3, dtype=torch.float16),
                                                           "e": torch.ones(0, 2)}))
    assert got["x"].device.type == "meta" and got["x"].shape == (2, 3) and got["x"].dtype == torch.float16
    assert got["e"].device.type == "meta" and got["e"].shape == (0, 2)
    assert _decode_in_parent(_bytes_as_if_on(("cpu", None), torch.ones(2))).device.type == "cpu"


@pytest.mark.parametrize("device", [("cuda", -1), ("cuda", "0"), ("cuda", True), ("cuda", 1 << 20), "cuda:0",
                                    ("cuda", 0, 0), (b"cuda", 0), ("cu da", 0), (["cuda"], 0)])
def test_a_malformed_device_record_is_refused(device):
    import torch

    with pytest.raises(pickle.UnpicklingError, match="bad device"):
        _decode_in_parent(_bytes_as_if_on(device, torch.ones(2)))


def test_a_device_the_parent_does_not_know_is_refused_and_meta_tensors_are_not_sent():
    import io

    import torch

    from conformance.isolation import Endpoint, _Encoder, _rebuild_device

    class Marker:
        pass

    class Device(pickle.Pickler):
        def reducer_override(self, o):
            return (_rebuild_device, ("bogus", 0)) if isinstance(o, Marker) else NotImplemented

    buf = io.BytesIO()
    Device(buf).dump(Marker())
    with pytest.raises(pickle.UnpicklingError, match="bad device 'bogus'"):
        _decode_in_parent(buf.getvalue())
    with pytest.raises(TypeError, match="meta device"):
        _Encoder(io.BytesIO(), Endpoint(None, is_parent=False)).dump(torch.ones(2, device="meta"))


def test_the_kernel_comparison_holds_for_outputs_sent_from_cuda(monkeypatch):
    """A backend in the engine process on CUDA returns CUDA outputs; a suite without CUDA gets
    them on CPU, and the kernel check still passes a right output and fails a wrong one."""
    import torch

    from conformance.kernels import TARGETED_CASES, build_batch, check_backend_matches_reference
    from fast.attention import get_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class RemoteOnCuda:
        name = "remote"

        def __init__(self, corrupt: bool):
            self.corrupt = corrupt

        def forward(self, *args):
            out = get_backend("torch").forward(*args)
            if self.corrupt:
                out[0, 0, 0] += 1.0
            return _decode_in_parent(_bytes_as_if_on(("cuda", 0), out))

    batch = build_batch(TARGETED_CASES[0].spec)
    check_backend_matches_reference(RemoteOnCuda(corrupt=False), batch)
    with pytest.raises(AssertionError, match="remote sequence 0"):
        check_backend_matches_reference(RemoteOnCuda(corrupt=True), batch)
