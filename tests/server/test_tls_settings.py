"""`--tls-cert`/`--tls-key`: both or neither, refused at start-up with the setting named when the files
cannot serve https, and the server's own URLs (what workers write into results and webhooks carry)
become https. The real handshake is tested in tests/service/test_doc_recipes.py."""

from __future__ import annotations

import pytest

from server.cli.main import build_parser, main
from server.settings import Settings, load_settings

from tls_certs import write_self_signed


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    return write_self_signed(tmp_path_factory.mktemp("tls"))


def test_serve_has_the_tls_flags_and_the_worker_not():
    cert, key = "c.pem", "k.pem"
    args = build_parser().parse_args(["serve", "--tls-cert", cert, "--tls-key", key])
    assert (str(args.tls_cert), str(args.tls_key)) == (cert, key)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--tls-cert", cert])


def test_a_valid_pair_is_accepted_and_the_own_base_url_is_https(tls_pair):
    cert, key = tls_pair
    settings = load_settings(None, {"MULTITALK_TLS_CERT": str(cert), "MULTITALK_TLS_KEY": str(key),
                                    "MULTITALK_HOST": "0.0.0.0", "MULTITALK_PORT": "8443"})
    assert settings.base_url == "https://127.0.0.1:8443"
    assert Settings(port=8443).base_url == "http://127.0.0.1:8443"
    assert Settings(tls_cert=cert, tls_key=key, public_url="https://api.example.com/").base_url == "https://api.example.com"


@pytest.mark.parametrize("given", ["MULTITALK_TLS_CERT", "MULTITALK_TLS_KEY"])
def test_one_without_the_other_is_refused(tls_pair, given):
    path = tls_pair[0] if given.endswith("CERT") else tls_pair[1]
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        load_settings(None, {given: str(path)})


def test_unreadable_or_unusable_files_are_refused_naming_the_setting(tls_pair, tmp_path):
    cert, key = tls_pair
    with pytest.raises(ValueError, match=rf"tls_key: cannot read {tmp_path / 'missing.pem'}: No such file"):
        Settings(tls_cert=cert, tls_key=tmp_path / "missing.pem").check()
    other_cert, other_key = write_self_signed(tmp_path / "other")
    with pytest.raises(ValueError, match="tls_cert/tls_key: .* not a PEM certificate and its unencrypted private key"):
        Settings(tls_cert=cert, tls_key=other_key).check()  # a key of another certificate
    with pytest.raises(ValueError, match="not a PEM certificate"):
        Settings(tls_cert=key, tls_key=key).check()


def test_serve_exits_with_the_reason_before_starting(tmp_path, tls_pair):
    with pytest.raises(SystemExit, match=r"multitalk serve: invalid setting: tls_cert: cannot read .*missing\.pem"):
        main(["serve", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tls_pair[1])])
