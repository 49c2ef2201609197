"""The `wafer generate` command: its JSON, its chat answer, and one-line errors on bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.cli_runner import assert_one_line_error, run_cli


def test_generate_json_fields(capsys, smollm2):
    rc, out, _ = run_cli(capsys, "generate", "--prompt-ids", "1,9690,198", "--max-new-tokens", "5", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["prompt_ids"] == [1, 9690, 198]
    assert 1 <= len(d["tokens"]) <= 5
    assert all(0 <= t < smollm2.config.vocab_size for t in d["tokens"])
    assert d["text"] == smollm2.tokenizer.decode(d["tokens"])
    for key in ("ttft_ms", "compile_s", "tok_per_s"):
        assert d[key] >= 0


def test_chat_answers_paris(capsys):
    rc, out, _ = run_cli(capsys, "generate", "--chat", "--prompt", "What is the capital of France?",
                         "--max-new-tokens", "16", "--json")
    assert rc == 0
    assert "Paris" in json.loads(out)["text"]


def test_plain_text_output(capsys):
    rc, out, err = run_cli(capsys, "generate", "--prompt", "The sky is", "--max-new-tokens", "4")
    assert rc == 0
    assert out.strip()
    assert "tok/s" in err


@pytest.mark.slow  # ~40 s on 2 cores; tests/test_hf_parity.py checks seeded sampling by default
def test_sampling_is_seeded(capsys):
    args = ("generate", "--prompt", "Once upon a time", "--max-new-tokens", "12", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.95", "--json")
    runs = [json.loads(run_cli(capsys, *args, "--seed", s)[1])["tokens"] for s in ("7", "7", "8")]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("argv, fragments", [
    (["generate", "--model", "nope", "--prompt", "x"], ["unknown model preset 'nope'", "smollm2-135m"]),
    (["generate", "--model", "llama3-8b", "--prompt", "x"], ["no embedded weights"]),
    (["generate", "--checkpoint", "/no/such/file.gguf", "--prompt", "x"], ["checkpoint not found"]),
    (["generate", "--prompt-ids", "1,a,3"], ["comma-separated integers"]),
    (["generate", "--prompt-ids", "1,999999"], ["outside the vocabulary"]),
    (["generate", "--prompt-ids", "1,2", "--max-new-tokens", "9000"], ["exceeds the model's context of 8192"]),
    (["generate", "--prompt-ids", "1,2", "--max-new-tokens", "0"], ["at least 1"]),
    (["generate", "--prompt", "x", "--top-p", "0"], ["top-p"]),
    (["generate", "--prompt", "x", "--temperature", "-1"], ["temperature"]),
    (["generate", "--prompt-ids", "1", "--chat"], ["--chat needs --prompt"]),
    (["generate"], ["required"]),
    (["generate", "--prompt", "x", "--max-new-tokens", "ten"], ["invalid int value"]),
    ([], ["required"]),
])
def test_bad_input_is_one_line(capsys, argv, fragments):
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, *fragments)


def test_prompt_longer_than_context(capsys):
    ids = ",".join(["198"] * 8200)
    rc, _, err = run_cli(capsys, "generate", "--prompt-ids", ids, "--max-new-tokens", "1")
    assert_one_line_error(rc, err, "prompt (8200 tokens)", "8192")


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(bad), "--prompt", "x")
    assert_one_line_error(rc, err, "garbage.gguf")


def test_truncated_gguf(capsys, tmp_path, smollm2):
    cut = tmp_path / "cut.gguf"
    with open(smollm2.source, "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(cut), "--prompt", "x")
    assert_one_line_error(rc, err, "cut.gguf")


def test_hf_folder_errors(capsys, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(folder), "--prompt-ids", "1")
    assert_one_line_error(rc, err, "no config.json")

    (folder / "config.json").write_text("{not json")
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(folder), "--prompt-ids", "1")
    assert_one_line_error(rc, err, "not valid JSON")

    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(folder), "--prompt-ids", "1")
    assert_one_line_error(rc, err, "unsupported architecture", "GPT2LMHeadModel")

    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128}))
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(folder), "--prompt-ids", "1")
    assert_one_line_error(rc, err, "no *.safetensors")

    (folder / "model.safetensors").write_bytes(os.urandom(256))
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(folder), "--prompt-ids", "1")
    assert_one_line_error(rc, err, "not a readable safetensors file")


def test_console_script_exit_code(tmp_path):
    """The installed entry point itself: exit code 2 and no traceback."""
    exe = shutil.which("wafer", path=os.path.dirname(sys.executable))
    assert exe, "the wafer console script is not installed next to this Python"
    proc = subprocess.run([exe, "generate", "--model", "nope", "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["wafer: error: unknown model preset 'nope'; known: "
                                                 + ", ".join(__import__("model.config").config.PRESETS)]


def jax_modules_after(code: str) -> str:
    """The JAX modules a fresh interpreter holds after running `code` in the repository, printed."""
    code += "import sys\nprint(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_command_line_is_built_without_importing_jax():
    """Every command's flags parse without JAX: `wafer --help` and `wafer simulate` start in well
    under a second, and no command starts JAX before its mesh flags set the CPU device count."""
    assert jax_modules_after("from cli.main import build_parser\n"
                             "build_parser().parse_args(['simulate', '--requests', '10'])\n") == "[]"


def test_a_simulation_that_needs_no_profile_runs_without_jax():
    """`wafer simulate` imports JAX only to trace a wafer profile it has not cached: an integrated
    fleet, and the KV wire bytes a disaggregated one ships, are priced without it (importing JAX
    cost 1.6 s of every simulation when the KV format pulled it in)."""
    assert jax_modules_after("import contextlib, io\n"
                             "from cli.main import main\n"
                             "from model.config import preset\n"
                             "from serve.costs import kv_wire_bytes\n"
                             "assert kv_wire_bytes(preset('llama3.1-70b'), 100) > 0\n"
                             "with contextlib.redirect_stdout(io.StringIO()):\n"
                             "    assert main(['simulate', '--integrated', '8', '--requests', '10', '--no-progress',"
                             " '--json']) == 0\n") == "[]"


@pytest.mark.slow  # ~32 s; the CLI mesh path stays covered by bench decode --mesh and the two-process generate test
def test_generate_on_a_mesh_matches_single_device(capsys):
    args = ("generate", "--prompt-ids", "1,9690,198,2683", "--max-new-tokens", "6", "--json")
    single = json.loads(run_cli(capsys, *args)[1])
    rc, out, _ = run_cli(capsys, *args, "--mesh", "2x2", "--schedule", "ktree")
    assert rc == 0
    mesh = json.loads(out)
    assert mesh["tokens"] == single["tokens"]
    assert mesh["mesh"] == "2x2" and mesh["schedule"] == "ktree"
    assert mesh["sram_per_core_bytes"]["weight"] > 0 and mesh["sram_per_core_bytes"]["kv"] > 0
    # 2 columns, 3 KV groups: whole heads would pad to 4 KV heads; one segment of both columns
    # (32 of the 64 dims of every head on each) holds fewer bytes per core.
    assert mesh["layout"] == "full" and mesh["head_segment"] == 2 and 0.9 < mesh["useful_fraction"] <= 1


@pytest.mark.parametrize("argv, fragments", [
    (["--mesh", "2y2"], ["mesh '2y2': expected RxC"]),
    (["--mesh", "0x2"], ["both sides must be positive"]),
    (["--mesh", "8x8"], ["JAX already started with 16 CPU devices; 64 are needed"]),
    (["--mesh", "2x2", "--executor", "gpus"], ["invalid choice: 'gpus'"]),
    (["--mesh", "2x2", "--sram-budget", "48KiB"], ["does not fit", "short by", "largest tensor"]),
    (["--mesh", "2x2", "--sram-budget", "lots"], ["size 'lots'"]),
    (["--mesh", "2x2", "--groups", "0"], ["--groups must be positive"]),
    (["--sram-budget", "1MiB"], ["--sram-budget needs --mesh"]),
    (["--layout", "full"], ["--layout needs --mesh"]),
    (["--mesh", "2x2", "--layout", "diagonal"], ["invalid choice: 'diagonal'"]),
])
def test_bad_mesh_flags_are_one_line(capsys, argv, fragments):
    rc, _, err = run_cli(capsys, "generate", "--prompt-ids", "1,2", "--max-new-tokens", "2", *argv)
    assert_one_line_error(rc, err, *fragments)


@pytest.mark.slow  # ~28 s on 2 cores (a profiler trace of a whole generate)
def test_trace_writes_a_profile(capsys, tmp_path):
    rc, _, _ = run_cli(capsys, "generate", "--prompt-ids", "1,2", "--max-new-tokens", "3", "--mesh", "1x2",
                       "--trace", str(tmp_path / "trace"))
    assert rc == 0
    assert any(name.endswith((".xplane.pb", ".trace.json.gz")) for _, _, files in os.walk(tmp_path) for name in files)
