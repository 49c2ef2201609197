"""`wafer serve`: its flags parsed into EngineOptions, one-line errors before anything starts, and
a whole run (start, answer the openai client, SIGTERM, clean exit) over a scripted engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from cli.main import build_parser
from cli.serve import format_cpus, options_from_args, parse_cpus
from kernels.allreduce import Schedule
from mesh.errors import WaferError
from mesh.executors import Executor, Grid
from serve.events import Mode
from serve.options import Distributed, EngineOptions
from tests.helpers.cli_runner import assert_one_line_error, run_cli
from tests.helpers.workers import FAKE_SERVE, REPO
from tests.helpers.workers.fake_serve import FAKE_REPLY

TIMEOUT_S = 60.0  # the subprocess imports JAX and reads the tokenizer before it listens


def options(*argv) -> EngineOptions:
    return options_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults():
    o = options()
    assert (o.mode, o.prefill_grid, o.decode_grid, o.executor, o.schedule) == \
        (Mode.DISAGGREGATED, Grid(1, 1), Grid(2, 2), Executor.DEVICES, None)  # None: --schedule auto
    assert (o.transport, o.prefill_cpus, o.decode_cpus, o.distributed, o.groups) == ("tcp", None, None, None, None)
    assert o.max_len == EngineOptions.max_len and o.scheduler.mode is Mode.DISAGGREGATED


def test_every_flag_lands_in_the_options():
    cpus = sorted(os.sched_getaffinity(0))
    o = options("--model", "smollm2-135m", "--mode", "integrated", "--prefill-mesh", "2x1", "--decode-mesh", "4x4",
                "--executor", "vcores", "--schedule", "ktree", "--groups", "2", "--slots", "3", "--max-len", "512",
                "--max-waiting", "5", "--prefill-cpus", str(cpus[0]), "--decode-cpus", f"{cpus[0]}-{cpus[-1]}",
                "--transport", "jax", "--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1")
    assert o.model == "smollm2-135m" and o.mode is Mode.INTEGRATED
    assert (o.prefill_grid, o.decode_grid, o.executor, o.schedule, o.groups) == \
        (Grid(2, 1), Grid(4, 4), Executor.VCORES, Schedule.KTREE, 2)
    assert (o.scheduler.slots, o.scheduler.max_waiting, o.scheduler.mode, o.max_len) == (3, 5, Mode.INTEGRATED, 512)
    assert o.prefill_cpus == (cpus[0],) and o.decode_cpus == tuple(range(cpus[0], cpus[-1] + 1))
    assert o.transport == "jax" and o.distributed == Distributed("10.0.0.1:1234", 2, 1)


def test_cpu_lists():
    allowed = os.sched_getaffinity(0)
    if not {0, 1} <= allowed:
        pytest.skip("needs CPUs 0 and 1 in this process's affinity")
    assert parse_cpus("0-1,0", "--x") == (0, 1)
    assert parse_cpus(" 1 ", "--x") == (1,)
    assert format_cpus((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    for bad in ("a", "1-0", "-1", "", "0,,1", "0-"):
        with pytest.raises(WaferError, match="expected CPU numbers"):
            parse_cpus(bad, "--x")


@pytest.mark.parametrize("argv, fragments", [
    (["--decode-mesh", "2y2"], ["--decode-mesh", "expected RxC"]),
    (["--prefill-mesh", "0x1"], ["--prefill-mesh", "positive"]),
    (["--prefill-cpus", "a"], ["--prefill-cpus 'a'", "0-3,6"]),
    (["--decode-cpus", "100000"], ["--decode-cpus", "CPU 100000 is not available"]),
    (["--groups", "2", "--schedule", "psum"], ["--groups needs --schedule ktree"]),
    (["--groups", "0", "--schedule", "ktree"], ["--groups", "positive"]),
    (["--slots", "0"], ["--slots", "positive"]),
    (["--max-waiting", "-1"], ["--max-waiting"]),
    (["--max-len", "1"], ["--max-len", "at least 2"]),
    (["--port", "70000"], ["--port 70000", "65535"]),
    (["--port", "http"], ["--port", "invalid int value"]),
    (["--mode", "split"], ["--mode", "invalid choice"]),
    (["--transport", "udp"], ["--transport", "invalid choice"]),
    (["--coordinator", "h:1"], ["--num-processes, --process-id missing"]),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], ["HOST:PORT"]),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], ["--process-id 2", "below"]),
    (["--model", "nope"], ["unknown model preset 'nope'"]),
    (["--checkpoint", "/no/such/file.gguf"], ["checkpoint not found"]),
])
def test_bad_flags_fail_in_one_line_before_anything_starts(capsys, argv, fragments):
    rc, out, err = run_cli(capsys, "serve", *argv)
    assert_one_line_error(rc, err, *fragments)
    assert out == ""


def test_serve_answers_the_openai_client_and_stops_on_sigterm(tmp_path):
    options_path = tmp_path / "options.json"
    proc = subprocess.Popen([sys.executable, FAKE_SERVE, str(options_path), "--port", "0", "--slots", "3",
                             "--max-len", "300", "--served-model-name", "smol"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + TIMEOUT_S
        lines = []
        while url is None and time.monotonic() < deadline:  # readline returns "" at EOF, so this ends
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                url = m.group(1)
        assert url is not None, "".join(lines)
        assert json.loads(options_path.read_text())["scheduler"]["slots"] == 3

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=10, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smol"]
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == FAKE_REPLY
        assert client.models.list().data[0].model_extra["max_model_len"] == 300

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=TIMEOUT_S)
        rest = proc.stderr.read()
        assert rc == 0, rest
        assert "stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)
        proc.stderr.close()
