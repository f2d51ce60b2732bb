"""Fast checks of the deployment's pieces that need no running SuperLink: certificates and keys, the
splitter, the app bundle, and the one-line errors for bad input on either side."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from client.deploy import (
    ClientDeployError,
    ClientSettings,
    check_auth_key,
    check_data,
    check_root_cert,
    check_superlink,
    parse_address,
)
from client.split import split_dataset
from common import DataError, load_dataset, load_local_file, partition_indices
from server.certs import (
    CertError,
    CertFiles,
    cert_hosts,
    check_public_key,
    check_server_certs,
    create_certs,
    issue_server_cert,
)
from server.deploy import (
    ServerDeployError,
    check_port_free,
    describe_round,
    security_from,
    stage_app,
)
from simulations.cli import main
from simulations.runconfig import resolve
from simulations.serve import run_config_from


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return create_certs(tmp_path_factory.mktemp("certs"), ["localhost", "127.0.0.1"], clients=2)


# ---- certificates ------------------------------------------------------------------------------------------

def test_certs_are_a_ca_a_server_cert_for_the_hosts_and_openssh_client_keys(certs: CertFiles) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sorted(cert_hosts(server)) == ["127.0.0.1", "localhost"]
    for private in (certs.ca_key, certs.server_key, certs.client_private_key("client-0")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    key = serialization.load_ssh_private_key(certs.client_private_key("client-1").read_bytes(), None)
    pub = serialization.load_ssh_public_key(certs.client_public_key("client-1").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert [p.name for p in certs.public_keys()] == ["client-0.pub", "client-1.pub"]
    assert check_server_certs(certs.root, "127.0.0.1") == certs
    check_server_certs(certs.root, "0.0.0.0")  # a wildcard bind address is not checked against the names


def test_a_server_cert_for_other_hosts_is_refused(certs: CertFiles) -> None:
    with pytest.raises(CertError, match=r"is for .*localhost.*not 'server.example.org'.*fedpriv certs"):
        check_server_certs(certs.root, "server.example.org")


def test_an_expired_server_cert_is_refused(tmp_path: Path) -> None:
    files = create_certs(tmp_path, ["localhost"], clients=0)
    now = dt.datetime.now(dt.UTC)
    issue_server_cert(files, ["localhost"], now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    with pytest.raises(CertError, match=r"server.crt expired on .*fedpriv certs"):
        check_server_certs(files.root, "localhost")


def test_a_key_that_does_not_match_the_cert_is_refused(tmp_path: Path, certs: CertFiles) -> None:
    files = create_certs(tmp_path, ["localhost"], clients=0)
    files.server_key.write_bytes(certs.server_key.read_bytes())
    with pytest.raises(CertError, match="server.key does not match .*server.crt"):
        check_server_certs(files.root, "localhost")


def test_a_server_cert_from_another_ca_is_refused(tmp_path: Path, certs: CertFiles) -> None:
    files = create_certs(tmp_path, ["localhost"], clients=0)
    files.ca_cert.write_bytes(certs.ca_cert.read_bytes())
    with pytest.raises(CertError, match="was not issued by"):
        check_server_certs(files.root, "localhost")


def test_missing_certificates_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="does not exist; create certificates with `fedpriv certs"):
        check_server_certs(tmp_path / "nowhere", "localhost")
    files = create_certs(tmp_path / "c", ["localhost"], clients=0)
    files.server_cert.unlink()
    with pytest.raises(CertError, match=r"server.crt is missing"):
        check_server_certs(files.root, "localhost")


@pytest.mark.parametrize("hosts", [[], [""], ["0.0.0.0"], ["https://x.org"]])
def test_unusable_host_names_are_refused(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(CertError, match="hosts"):
        create_certs(tmp_path, hosts, clients=0)


def test_existing_certificates_are_kept_unless_forced(tmp_path: Path) -> None:
    files = create_certs(tmp_path, ["localhost"], clients=0)
    before = files.ca_cert.read_bytes()
    with pytest.raises(CertError, match="already exists; .*--force"):
        create_certs(tmp_path, ["localhost"], clients=0)
    create_certs(tmp_path, ["localhost"], clients=0, overwrite=True)
    assert files.ca_cert.read_bytes() != before


def test_client_public_keys_must_be_openssh_ec(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(rsa_key.public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH))
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(CertError, match="RSA key; SuperNode authentication needs an EC key"):
        check_public_key(tmp_path / "rsa.pub")
    with pytest.raises(CertError, match="is not an OpenSSH public key"):
        check_public_key(tmp_path / "junk.pub")


def test_certs_command_says_what_each_file_is_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["certs", "--out", str(tmp_path / "c"), "--hosts", "localhost", "--clients", "1"]) == 0
    out = capsys.readouterr().out
    assert "ca.crt" in out and "copy to every client" in out
    assert "ca.key" in out and "keep it offline" in out
    assert "client-keys/client-0.key" in out and "give it to client-0 only" in out
    assert main(["certs", "--out", str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err


# ---- split -------------------------------------------------------------------------------------------------

def test_split_writes_the_simulations_partition_one_file_per_client(tmp_path: Path) -> None:
    files = split_dataset("digits", 3, "dirichlet:0.5", tmp_path, seed=3)
    ds = load_dataset("digits")
    parts = partition_indices(ds.y_train, "dirichlet:0.5", 3, 3, groups=ds.groups)
    assert [f.path.name for f in files] == ["client-0.npz", "client-1.npz", "client-2.npz"]
    for f, idx in zip(files, parts, strict=True):
        x, y = load_local_file(f.path)
        np.testing.assert_array_equal(x, ds.x_train[idx])
        np.testing.assert_array_equal(y, ds.y_train[idx])
        assert f.examples == len(idx) and sum(f.labels.values()) == len(idx)
    assert sum(f.examples for f in files) == len(ds.y_train)


def test_split_caps_examples_and_refuses_bad_input(tmp_path: Path) -> None:
    files = split_dataset("digits", 2, "iid", tmp_path / "a", max_examples=50)
    assert [f.examples for f in files] == [50, 50]
    with pytest.raises(DataError, match="already exists; .*--force"):
        split_dataset("digits", 2, "iid", tmp_path / "a")
    with pytest.raises(DataError, match="unknown partition"):
        split_dataset("digits", 2, "zipf", tmp_path / "b")
    with pytest.raises(DataError, match="num_clients 0"):
        split_dataset("digits", 0, "iid", tmp_path / "c")
    with pytest.raises(DataError, match="unknown dataset"):
        split_dataset("mnist", 2, "iid", tmp_path / "d")


def test_split_command_prints_the_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["split", "--dataset", "digits", "--num-clients", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "client-0.npz") in out and "examples" in out


# ---- client side: bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["localhost", "localhost:", ":9092x", "h:70000", "h:0"])
def test_a_malformed_superlink_address_is_refused(address: str) -> None:
    with pytest.raises(ClientDeployError, match="is not HOST:PORT"):
        parse_address(address)


def test_an_unreachable_superlink_is_named(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ClientDeployError, match=f"cannot reach the SuperLink at 127.0.0.1:{port}"):
            check_superlink("127.0.0.1", port, None, timeout=2)
    with pytest.raises(ClientDeployError, match="unknown host"):
        check_superlink("no-such-host.invalid", 9092, None, timeout=2)


def _tls_server(files: CertFiles) -> tuple[int, threading.Thread]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_tls_checks_the_server_against_the_clients_ca(tmp_path: Path, certs: CertFiles) -> None:
    port, thread = _tls_server(certs)
    check_superlink("127.0.0.1", port, certs.ca_cert)  # the right CA: passes
    thread.join(5)
    other = create_certs(tmp_path, ["localhost"], clients=0)
    port, thread = _tls_server(certs)
    with pytest.raises(ClientDeployError, match="presented a certificate .* does not vouch for"):
        check_superlink("127.0.0.1", port, other.ca_cert)
    thread.join(5)


def test_missing_expired_or_wrong_client_credentials(tmp_path: Path, certs: CertFiles) -> None:
    with pytest.raises(ClientDeployError, match="CA certificate .* is missing"):
        check_root_cert(tmp_path / "ca.crt")
    (tmp_path / "bad.crt").write_text("junk")
    with pytest.raises(ClientDeployError, match="is not a PEM certificate"):
        check_root_cert(tmp_path / "bad.crt")
    with pytest.raises(ClientDeployError, match="is not an unencrypted OpenSSH private key"):
        check_auth_key(certs.server_key)  # a PEM key, not the OpenSSH client key
    with pytest.raises(ClientDeployError, match="authentication key .* is missing"):
        check_auth_key(tmp_path / "none.key")
    check_root_cert(certs.ca_cert)
    check_auth_key(certs.client_private_key("client-0"))


def test_an_expired_ca_certificate_is_refused_on_the_client(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now - dt.timedelta(days=35)).sign(key, hashes.SHA256()))
    (tmp_path / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ClientDeployError, match="CA certificate .* expired on .*ask the server operator"):
        check_root_cert(tmp_path / "ca.crt")


def test_a_data_file_that_does_not_fit_the_task_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "flat.npz", x=np.zeros((10, 64), np.float32), y=np.zeros(10, np.int64))
    np.savez(tmp_path / "labels.npz", x=np.zeros((10, 1, 8, 8), np.float32), y=np.full(10, 12))
    np.savez(tmp_path / "good.npz", x=np.zeros((10, 1, 8, 8), np.float32), y=np.arange(10))
    with pytest.raises(DataError, match=r"shape \(64,\).*needs \(1, 8, 8\)"):
        check_data(tmp_path / "flat.npz", "digits")
    with pytest.raises(DataError, match=r"labels span 12..12.*classes 0..9"):
        check_data(tmp_path / "labels.npz", "digits")
    with pytest.raises(DataError, match="no such file"):
        check_data(tmp_path / "none.npz", None)
    assert check_data(tmp_path / "good.npz", "digits") == "10 examples of shape (1, 8, 8), labels 0..9"


def test_client_settings_refuse_contradictions(tmp_path: Path) -> None:
    base = dict(superlink="127.0.0.1:9092", data=tmp_path / "d.npz", state_dir=tmp_path, client_id="c")
    with pytest.raises(ClientDeployError, match="no CA certificate: pass --certs"):
        ClientSettings(**base)
    with pytest.raises(ClientDeployError, match="--insecure with certificates"):
        ClientSettings(**base, insecure=True, root_cert=tmp_path / "ca.crt")
    with pytest.raises(ClientDeployError, match="--budget-delta without --budget-epsilon"):
        ClientSettings(**base, insecure=True, budget_delta=1e-5)
    with pytest.raises(ClientDeployError, match="client id 'a b' is not allowed"):
        ClientSettings(**{**base, "client_id": "a b"}, insecure=True)
    settings = ClientSettings(**base, insecure=True, budget_epsilon=3.0, budget_delta=1e-5)
    assert settings.node_config() == {"data-path": str(tmp_path / "d.npz"), "client-id": "c",
                                      "state-dir": str(tmp_path), "device": "cpu", "budget-epsilon": 3.0,
                                      "budget-delta": 1e-5}


def test_client_command_gives_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              certs: CertFiles) -> None:
    np.savez(tmp_path / "site.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
    common = ["client", "--data", str(tmp_path / "site.npz"), "--state-dir", str(tmp_path / "s")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert main([*common, "--superlink", f"127.0.0.1:{port}", "--insecure", "--wait-superlink", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach the SuperLink" in err
    assert main([*common, "--superlink", "127.0.0.1:9", "--certs", str(certs.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no key for client 'site'" in err and err.count("\n") == 0


# ---- server side: bad input and the app bundle -------------------------------------------------------------

def _server_args(**over: object) -> argparse.Namespace:
    values = dict(config=None, set=[], insecure=False, certs=None, resume=None, out=None, min_clients=None,
                  round_timeout=None)
    values.update(over)
    from simulations.simulate import RUN_FLAGS

    for flag in RUN_FLAGS:
        values.setdefault(flag.replace("-", "_"), None)
    values.update(over)
    return argparse.Namespace(**values)


def test_server_security_needs_a_choice_and_client_keys(tmp_path: Path, certs: CertFiles) -> None:
    with pytest.raises(ServerDeployError, match="no certificates: pass --certs DIR"):
        security_from(_server_args(), "127.0.0.1")
    with pytest.raises(ServerDeployError, match="--insecure with --certs"):
        security_from(_server_args(insecure=True, certs=str(certs.root)), "127.0.0.1")
    files, keys = security_from(_server_args(certs=str(certs.root)), "127.0.0.1")
    assert files == certs and [k.name for k in keys] == ["client-0.pub", "client-1.pub"]
    bare = create_certs(tmp_path, ["localhost"], clients=0)
    with pytest.raises(ServerDeployError, match="no client public keys in .*client-keys"):
        security_from(_server_args(certs=str(bare.root)), "localhost")


def test_server_run_config_fresh_and_resumed(tmp_path: Path) -> None:
    config = run_config_from(_server_args(out=str(tmp_path / "run"), dataset="digits", min_clients=2,
                                          round_timeout=30.0))
    assert config["out-dir"] == str(tmp_path / "run") and config["resume-from"] == ""
    assert (config["min-clients"], config["round-timeout"], config["dataset"]) == (2, 30.0, "digits")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(ServerDeployError, match="already holds a run's records; continue it with --resume"):
        run_config_from(_server_args(out=str(tmp_path / "run")))
    with pytest.raises(ServerDeployError, match="no checkpoint.pt there"):
        run_config_from(_server_args(resume=str(tmp_path / "run")))
    import tomli_w

    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "run" / "config.toml").write_text(tomli_w.dumps({**config, "num-rounds": 7}))
    resumed = run_config_from(_server_args(resume=str(tmp_path / "run"), min_clients=3))
    assert resumed["resume-from"] == str(tmp_path / "run") and resumed["out-dir"] == str(tmp_path / "run")
    assert (resumed["num-rounds"], resumed["min-clients"], resumed["dataset"]) == (7, 3, "digits")


def test_a_busy_port_is_named(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ServerDeployError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)


def test_server_command_gives_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["server", "--out", str(tmp_path / "r"), "--address", "nowhere"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert main(["server", "--out", str(tmp_path / "r"), "--certs", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist; create certificates with `fedpriv certs" in err and err.count("\n") == 0


def test_the_app_bundle_holds_the_source_and_this_runs_config(tmp_path: Path) -> None:
    config = resolve(None, {"dataset": "digits", "out-dir": str(tmp_path / "run")})
    app = stage_app(config, tmp_path / "app")
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == config
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                            "clientapp": "client.app:app"}
    for module in ("server/app.py", "client/app.py", "models/__init__.py", "privacy/ledger.py"):
        assert (app / module).is_file(), module
    files = [p for p in app.rglob("*") if p.is_file()]
    assert all(p.suffix in (".py", ".toml") for p in files)
    assert sum(p.stat().st_size for p in files) < 10 * 2**20  # Flower's limit for an app bundle


def test_round_lines_say_who_trained_and_who_was_missing() -> None:
    record = {"round": 2, "server": {"accuracy": 0.5}, "train": [{"client_id": "a"}, {"client_id": "b"}],
              "missing": ["c"], "dropped": [{"client_id": "d", "reason": "client failed: " + "x" * 200}],
              "refused": [], "seconds": 3.25}
    line = describe_round(record, 3)
    assert line.startswith("round 2/3  accuracy 0.5000  trained: a, b  missing: c  dropped d: client failed")
    assert line.endswith("3.2 s") and len(line) < 200
    assert json.dumps(record)  # records are plain JSON
