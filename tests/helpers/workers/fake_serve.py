"""`wafer serve` with a scripted engine in place of serve.engine, launched by tests/test_serve_cli.py.

    python tests/helpers/workers/fake_serve.py OPTIONS_JSON [wafer serve flags...]

Runs the real command (flags, tokenizer, server, signals, shutdown) over tests.helpers.fake_engine,
whose every request answers FAKE_REPLY. The EngineOptions the command built are written to
OPTIONS_JSON when the engine is made, for the test to check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types

# The repository root (tests/helpers/workers/ is three folders below it) first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

FAKE_REPLY = "Hello from the fake engine."


def main(options_path: str, argv: list[str]) -> int:
    from cli.main import main as wafer
    from model.config import SMOLLM2_135M
    from model.load import load_tokenizer
    from tests.helpers.fake_engine import FakeEngine, Script

    reply = tuple(load_tokenizer().encode(FAKE_REPLY, add_special_tokens=False))

    def worker_engine(options, metrics):
        with open(options_path, "w") as f:
            json.dump(dataclasses.asdict(options), f, default=lambda x: getattr(x, "value", str(x)))
        engine = FakeEngine(SMOLLM2_135M, capacity=options.max_len)
        engine.script = Script(tokens=reply)
        return engine

    fake = types.ModuleType("serve.engine")
    fake.WorkerEngine = worker_engine
    sys.modules["serve.engine"] = fake
    return wafer(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
