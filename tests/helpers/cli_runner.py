"""The `wafer` command line run in-process, as tests drive it."""

from cli.main import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `wafer *argv`, read from pytest's `capsys`."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    """A usage error: exit code 2, one `wafer: error:` line holding every fragment, no traceback."""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wafer: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
