"""`wafer kv export | inspect | import` and `wafer bench kv`: SmolLM2 through a file decodes exactly,
bad input is one line and exit code 2."""

import json

import pytest

from model.generate import Generator
from tests.helpers.cli_runner import assert_one_line_error, run_cli

PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2_tokens(smollm2):
    tokens = Generator(smollm2.params, smollm2.config).generate([PROMPT_IDS], NEW_TOKENS, stop_on_eos=False).tokens[0]
    assert len(set(tokens)) > 5
    return tokens


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2):
    path = str(tmp_path_factory.mktemp("kv") / "smollm2.kv")
    from cli.main import main
    assert main(["kv", "export", "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--out", path,
                 "--prefill-mesh", "2", "--json"]) == 0
    return path


def test_export_inspect_import_decodes_exactly(capsys, exported, smollm2_tokens):
    capsys.readouterr()
    rc, out, _ = run_cli(capsys, "kv", "inspect", exported, "--json")
    assert rc == 0
    d = json.loads(out)
    assert (d["model"]["name"], d["layers"], d["kv_heads"], d["head_dim"], d["tokens"]) == (
        "smollm2-135m", 30, 3, 64, len(PROMPT_IDS))
    assert d["layout"]["grid"] == [1, 2] and d["layout"]["padded"] == {"K": 4}  # 3 heads over 2 columns
    assert d["first_token"] == smollm2_tokens[0] and len(d["frames"]) == 30
    rc, out, _ = run_cli(capsys, "kv", "inspect", exported)
    assert rc == 0 and "layer  29  xxh3-64" in out
    # --no-eos: the decode stops at EOS; the first 16 tokens of this prompt contain none.
    assert 2 not in smollm2_tokens
    rc, out, _ = run_cli(capsys, "kv", "import", exported, "--mesh", "3x3", "--max-new-tokens", str(NEW_TOKENS),
                         "--json")
    assert rc == 0
    assert json.loads(out)["tokens"] == smollm2_tokens


def test_bad_files_are_one_line_errors(capsys, exported, tmp_path):
    with open(exported, "rb") as f:
        data = f.read()
    flipped = tmp_path / "flipped.kv"
    flipped.write_bytes(data[:5000] + bytes([data[5000] ^ 4]) + data[5001:])
    truncated = tmp_path / "truncated.kv"
    truncated.write_bytes(data[:-10])
    for argv, fragments in [
        (["kv", "inspect", str(flipped)], ["layer 0: checksum mismatch"]),
        (["kv", "inspect", str(truncated)], ["stream truncated"]),
        (["kv", "import", str(truncated), "--mesh", "2x2"], ["stream truncated"]),
        (["kv", "inspect", str(tmp_path / "missing.kv")], ["cannot read"]),
        (["kv", "import", exported, "--mesh", "2x2", "--max-new-tokens", "0"], ["must be a positive integer"]),
        (["kv", "export", "--prompt-ids", "1,2", "--out", str(tmp_path / "x.kv"), "--prefill-mesh", "2y"],
         ["mesh '2y'"]),
        (["kv", "export", "--prompt-ids", "1,2", "--out", str(tmp_path / "no" / "x.kv")], ["cannot write"]),
    ]:
        rc, _, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, *fragments)


def test_import_refuses_another_model(capsys, exported, tmp_path):
    from tests.helpers.hf_checkpoints import write_llama3
    path = write_llama3(str(tmp_path / "llama"))
    capsys.readouterr()  # transformers' progress bar
    rc, _, err = run_cli(capsys, "kv", "import", exported, "--checkpoint", path, "--mesh", "1x2")
    assert_one_line_error(rc, err, "model mismatch")


@pytest.mark.parametrize("transports", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bench_kv_json(capsys, transports):
    rc, out, _ = run_cli(capsys, "bench", "kv", "--tokens", "64", "--repeats", "1", "--json",
                         *([] if transports else ["--skip-transports"]))
    assert rc == 0
    d = json.loads(out)
    assert d["cache_bytes"] == 30 * 2 * 3 * 64 * 64 * 4  # L * (K, V) * K heads * H * n * 4 B
    keys = ["serialize_GBps", "deserialize_GBps", "memcpy_GBps", "ratio_to_memcpy"]
    keys += ["tcp_loopback_GBps", "jax_transfer_GBps"] if transports else []
    for key in keys:
        assert d[key] > 0, key


def test_bench_kv_dtypes_in_one_run(capsys):
    """`--dtypes float32,bfloat16`: the bfloat16 stream carries half the payload, each dtype's rate
    is measured in the same run; a bad list is a one-line error."""
    rc, out, _ = run_cli(capsys, "bench", "kv", "--tokens", "64", "--repeats", "1", "--json", "--skip-transports",
                         "--dtypes", "float32,bfloat16")
    assert rc == 0
    d = json.loads(out)
    f32, bf16 = d["by_dtype"]["float32"], d["by_dtype"]["bfloat16"]
    assert f32["cache_bytes"] == 30 * 2 * 3 * 64 * 64 * 4 and bf16["cache_bytes"] == 30 * 2 * 3 * 64 * 64 * 2
    assert d["vs_first"]["bfloat16"]["serialize_plus_deserialize_GBps"] > 0
    rc, _, err = run_cli(capsys, "bench", "kv", "--dtypes", "float32,int8")
    assert_one_line_error(rc, err, "--dtypes 'float32,int8'")


class _ClosedPipe:
    """stdout whose reader has gone (`wafer kv inspect ... | head` after head exits)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_ends_quietly_with_sigpipes_status(exported, monkeypatch, capsys):
    from cli.main import EXIT_BROKEN_PIPE, main
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["kv", "inspect", exported]) == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""
