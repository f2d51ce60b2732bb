"""Every flag or key that names a file or folder is checked before anything starts: one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.cli import main


@pytest.fixture()
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    return tmp_path


CASES = [
    # (argv, what the one line must say). The first ones ended in a traceback before.
    (["simulate", "--dataset", "digits", "--out", "afile"], "--out (out-dir) {p}/afile is a file"),
    (["simulate", "--dataset", "digits", "--out", "afile/run"], "{p}/afile is a file, so no folder"),
    (["simulate", "--config", "adir"], "--config {p}/adir is a folder"),
    (["simulate", "--config", "missing.toml"], "--config {p}/missing.toml does not exist"),
    (["simulate", "--dataset", "fashion-mnist", "--data-dir", "afile"], "--data-dir (data-dir) {p}/afile is a file"),
    (["simulate", "--set", "resume-from=nothere"], "resume-from {p}/nothere does not exist"),
    (["split", "--dataset", "digits", "--num-clients", "2", "--out", "afile"], "--out {p}/afile is a file"),
    (["certs", "--out", "afile"], "--out {p}/afile is a file"),
    (["compare", "--preset", "quick", "--out", "afile"], "--out {p}/afile is a file"),
    (["sweep", "--dataset", "digits", "--set", "seed=1,2", "--out", "afile"], "--out {p}/afile is a file"),
    (["server", "--insecure", "--dataset", "digits", "--out", "afile"], "--out (out-dir) {p}/afile is a file"),
    (["server", "--insecure", "--resume", "afile"], "--resume {p}/afile is a file"),
    (["client", "--superlink", "127.0.0.1:9", "--insecure", "--data", "adir", "--state-dir", "s"],
     "--data {p}/adir is a folder"),
    (["client", "--superlink", "127.0.0.1:9", "--insecure", "--data", "nothere.npz", "--state-dir", "s"],
     "--data {p}/nothere.npz does not exist"),
]


@pytest.mark.parametrize(("argv", "said"), CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_a_bad_path_is_one_line_before_anything_starts(place: Path, argv: list[str], said: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in place.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said.format(p=place) in err[0], err
    assert sorted(p.name for p in place.iterdir()) == before  # nothing was made


def test_a_client_state_dir_that_is_a_file(place: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    np.savez(place / "own.npz", x=np.zeros((4, 1, 8, 8), dtype=np.float32), y=np.arange(4))
    assert main(["client", "--superlink", "127.0.0.1:9", "--insecure", "--data", "own.npz",
                 "--state-dir", "afile"]) == 2
    assert f"--state-dir {place}/afile is a file" in capsys.readouterr().err


def test_a_folder_the_system_refuses_is_one_line(place: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Writable by the checks' lights (root may write anywhere), refused by the system: /proc takes no folders."""
    if not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    assert main(["simulate", "--dataset", "digits", "--model", "mlp", "--rounds", "1",
                 "--out", "/proc/fedpriv-test/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedpriv simulate: error: /proc/fedpriv-test"), err
    assert "check the path" in err[0]
