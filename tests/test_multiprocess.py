"""The wafer decode on a mesh spanning two processes (`jax.distributed`, CPU, gloo over 127.0.0.1).

Two worker processes (tests/helpers/workers/multiprocess_decode.py) with two CPU devices each
form one 2x2 decode mesh: mesh row 0 lies on process 0 and row 1 on process 1, so every reduction
along ROW crosses processes. Each decodes the same prompt greedily; the tokens both read back must
be exactly those of the single-process, single-device decoder run here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mesh.distributed import init_cpu_process
from mesh.errors import WaferError
from tests.helpers.workers import MULTIPROCESS_DECODE as WORKER
from tests.helpers.workers import REPO, worker_env
from tests.helpers.workers.multiprocess_decode import NEW_TOKENS, PROMPT

PROCESSES = 2
LOCAL_DEVICES = 2
GRID = "2x2"
# Whole-run limit for both workers (start, join, compile, decode). Typical on a 2-core machine:
# 3-10 s for a tiny model, 25-55 s for SmolLM2.
TIMEOUT_S = 240


def _gloo_available() -> bool:
    from jax._src.lib import _jax
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _exit_report(pid: int, proc: subprocess.Popen, log_path: str) -> str:
    return f"worker {pid} exited with {proc.returncode}; its log ends:\n{_tail(log_path)}"


def run_workers(model: str, out_dir) -> list[dict]:
    """Launch the workers, wait for all of them, return each process's report."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = worker_env()
    procs, logs = [], []
    try:
        for pid in range(PROCESSES):
            log_path = os.path.join(out_dir, f"process{pid}.log")
            logs.append(log_path)
            # Output goes to files, not pipes: a worker blocked on a full pipe would hang its peer.
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, WORKER, coordinator, str(PROCESSES), str(pid), str(LOCAL_DEVICES), GRID, model,
                     str(out_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL))
        # Poll all of them: a worker that dies leaves its peer waiting on a collective, so the
        # first failure ends the run instead of the peer's timeout.
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            for pid, p in enumerate(procs):
                assert p.poll() in (None, 0), _exit_report(pid, p, logs[pid])
            if time.monotonic() > deadline:
                pytest.fail(f"workers still running after {TIMEOUT_S} s; worker 0's log ends:\n{_tail(logs[0])}")
            time.sleep(0.1)
        for pid, p in enumerate(procs):
            assert p.returncode == 0, _exit_report(pid, p, logs[pid])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # SIGKILLed and still not reaped: nothing more a test can do
    reports = []
    for pid in range(PROCESSES):
        with open(os.path.join(out_dir, f"process{pid}.json")) as f:
            reports.append(json.load(f))
    return reports


def single_process_tokens(params, config) -> list[int]:
    from model.generate import Generator
    return Generator(params, config).generate([PROMPT], NEW_TOKENS, stop_on_eos=False).tokens[0]


def check_two_process_decode(model: str, params, config, tmp_path) -> None:
    reports = run_workers(model, tmp_path)
    expected = single_process_tokens(params, config)
    assert len(expected) == NEW_TOKENS
    for pid, report in enumerate(reports):
        assert report["process_count"] == PROCESSES, report
        # Rows of the 2x2 mesh: (0, 0), (0, 1) on process 0; (1, 0), (1, 1) on process 1.
        assert report["mesh_processes"] == [0, 0, 1, 1], report
        assert report["prefill_local"], f"process {pid} prefilled on another process's device"
        # Greedy decoding: identical tokens, no tolerance.
        assert report["tokens"] == expected, f"process {pid}"
        assert report["last_argmax"] == expected[-1], f"process {pid}: last_logits disagrees with the last token"


needs_gloo = pytest.mark.skipif(not _gloo_available(),
                                reason="this jaxlib has no gloo CPU collectives (jax.distributed on CPU needs them)")


@needs_gloo
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])  # untied; tied embeddings + QKV bias
def test_two_process_decode_tiny(name, tmp_path):
    from model.config import preset
    from model.weights import init_random_params
    config = preset(name)
    check_two_process_decode(name, init_random_params(config, seed=0), config, tmp_path)


@needs_gloo
@pytest.mark.slow  # 25-55 s on 2 cores, mostly each worker compiling 30 layers
def test_two_process_decode_smollm2(smollm2, tmp_path):
    check_two_process_decode(smollm2.config.name, smollm2.params, smollm2.config, tmp_path)


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1", 2, 0, 2), "HOST:PORT"),
    (("127.0.0.1:http", 2, 0, 2), "not a number"),
    (("127.0.0.1:70000", 2, 0, 2), "outside 1..65535"),
    (("127.0.0.1:1234", 0, 0, 2), "process count"),
    (("127.0.0.1:1234", 2, 2, 2), "process id 2 is outside 0..1"),
    (("127.0.0.1:1234", 2, -1, 2), "process id -1"),
    (("127.0.0.1:1234", 2, 0, 0), "local device count"),
])
def test_init_cpu_process_refuses_bad_arguments(args, message):
    with pytest.raises(WaferError, match=message):
        init_cpu_process(*args)


def test_init_cpu_process_refuses_a_started_backend():
    import jax
    jax.devices()  # this test process's backend exists from here on
    with pytest.raises(WaferError, match="already started"):
        init_cpu_process("127.0.0.1:1234", 2, 0, 2)


# ---------------------------------------------------------------------------------------------
# `wafer generate --coordinator HOST:PORT --num-processes N --process-id I`

CLI_PROMPT = "1,17,42,7,300,5,99"


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *argv]


def run_cli_processes(argv: list[str], tmp_path) -> list[tuple[str, str]]:
    """Run `wafer *argv --coordinator ... --process-id I` as PROCESSES processes; (stdout, stderr) of each."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, files = [], []
    try:
        for pid in range(PROCESSES):
            out_path, err_path = tmp_path / f"cli{pid}.out", tmp_path / f"cli{pid}.err"
            files.append((out_path, err_path))
            with open(out_path, "w") as out, open(err_path, "w") as err:
                procs.append(subprocess.Popen(
                    _cli(*argv, "--coordinator", coordinator, "--num-processes", str(PROCESSES), "--process-id",
                         str(pid)), cwd=REPO, env=worker_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            for pid, p in enumerate(procs):
                assert p.poll() in (None, 0), _exit_report(pid, p, str(files[pid][1]))
            if time.monotonic() > deadline:
                pytest.fail(f"processes still running after {TIMEOUT_S} s; process 0's stderr ends:\n"
                            f"{_tail(str(files[0][1]))}")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
    return [(out.read_text(), err.read_text()) for out, err in files]


@needs_gloo
def test_generate_cli_across_two_processes(tiny_checkpoint, tmp_path, capsys):
    """Two `wafer generate` processes share one 2x2 mesh (a row each) and answer with the tokens of
    the same command in one process; only process 0 prints."""
    from tests.helpers.cli_runner import run_cli

    argv = ["generate", "--checkpoint", tiny_checkpoint, "--prompt-ids", CLI_PROMPT, "--max-new-tokens", "16",
            "--mesh", "2x2", "--executor", "devices", "--json"]
    rc, out, _ = run_cli(capsys, *argv)
    assert rc == 0
    want = json.loads(out)["tokens"]
    assert len(set(want)) > 3  # a varied continuation: a broken mesh cannot match by luck
    (out0, err0), (out1, err1) = run_cli_processes(argv, tmp_path)
    answer = json.loads(out0)
    assert answer["tokens"] == want  # greedy: identical tokens, no tolerance
    assert answer["processes"] == PROCESSES and answer["mesh"] == "2x2"
    assert out1 == ""  # process 1 decoded too, and kept quiet
    assert "process 1 of 2: joining the mesh" in err1


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "2x2", "--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--mesh", "2x2", "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "process id 2 is outside 0..1"),
    (["--mesh", "2x2", "--coordinator", "127.0.0.1:1234", "--num-processes", "2"],
     "--coordinator needs --num-processes and --process-id"),
    (["--mesh", "2x2", "--num-processes", "2", "--process-id", "1"], "--num-processes needs --coordinator"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"], "needs --mesh"),
    (["--mesh", "2x2", "--executor", "vcores", "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
      "--process-id", "0"], "--executor devices"),
    (["--mesh", "2x2", "--coordinator", "127.0.0.1:1234", "--num-processes", "3", "--process-id", "0"],
     "4 cores) does not split evenly over 3 processes"),
    (["--mesh", "2x2", "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"],
     "at least 0"),
    (["--mesh", "2x2", "--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     "a positive integer"),
])
def test_generate_process_flags_refuse_bad_values(capsys, flags, message):
    from tests.helpers.cli_runner import assert_one_line_error, run_cli

    rc, _, err = run_cli(capsys, "generate", "--prompt-ids", "1,2", *flags)
    assert_one_line_error(rc, err, message)


def test_generate_without_a_coordinator_fails_in_one_line():
    """A process other than 0 whose coordinator never listens fails with a sentence, not JAX's abort;
    so does a process 0 that cannot listen at the address (here: a port already taken)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        cases = [(f"127.0.0.1:{_free_port()}", "1", "no coordinator answered at"),
                 (busy, "0", "process 0 cannot listen there")]
        for coordinator, pid, message in cases:
            proc = subprocess.run(_cli("generate", "--prompt-ids", "1,2", "--mesh", "2x2", "--coordinator",
                                       coordinator, "--num-processes", "2", "--process-id", pid,
                                       "--coordinator-timeout", "1"),
                                  cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2, proc.stderr[-3000:]
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith("wafer: error:") and message in last, proc.stderr
            assert "Traceback" not in proc.stderr
