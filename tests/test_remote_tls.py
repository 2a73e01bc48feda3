"""STARTTLS on outgoing SMTP (RFC 3207) and control/tlspolicy, against real TLS servers
on loopback with a certificate made by `openssl req -x509`."""

import shutil

import pytest

from tests.remote_peers import MESSAGE, make_cert, server_context

pytest_plugins = ["tests.remote_site"]  # the `site` fixture
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (Debian package openssl)")
    return make_cert(tmp_path_factory.mktemp("cert"), ["mx.tls.test"], ["127.0.0.2"])


def tls_site(site, cert, policy=None, trust=False):
    site.mx("tls.test", (10, "mx.tls.test", "127.0.0.2"))
    if policy:
        site.control("tlspolicy", policy)
    if trust:
        shutil.copy(cert[0], site.root.control_dir + "/tlsca.pem")
    return site.smtp("127.0.0.2", tls=server_context(*cert))


def test_starttls_when_offered(site, cert):
    peer = tls_site(site, cert)
    res = site.deliver(["a@tls.test", "b@tls.test"])
    assert [r[0] for r in res] == ["K", "K"]
    [mail] = peer.mails
    assert mail.tls and mail.helo == "relay.test" and mail.data == MESSAGE.replace(b"\n", b"\r\n")
    [line] = [x for x in site.log if "TLS to 127.0.0.2" in x]
    assert "for tls.test: TLSv1." in line and line.endswith("certificate not verified")


def test_policy_verify_with_a_trusted_ca(site, cert):
    peer = tls_site(site, cert, policy="tls.test:verify\n", trust=True)
    assert site.deliver(["a@tls.test"])[0][0] == "K"
    assert peer.mails[0].tls
    assert any(line.endswith("certificate verified") for line in site.log)


def test_policy_verify_with_an_untrusted_certificate_defers(site, cert):
    peer = tls_site(site, cert, policy=".test:verify\n")
    [(letter, text)] = site.deliver(["a@tls.test"])
    assert letter == "Z"
    assert text.startswith("Connected to 127.0.0.2 but the TLS handshake failed: ")
    assert "certificate" in text and text.endswith("(#4.7.5)\n")
    assert not peer.mails  # no cleartext fallback


def test_policy_verify_checks_the_exchangers_name(site, cert):
    site.mx("other.test", (10, "mx.other.test", "127.0.0.2"))  # same server, another name
    site.control("tlspolicy", "other.test:verify\n")
    shutil.copy(cert[0], site.root.control_dir + "/tlsca.pem")
    peer = site.smtp("127.0.0.2", tls=server_context(*cert))
    [(letter, text)] = site.deliver(["a@other.test"])
    assert letter == "Z" and "TLS handshake failed" in text and "mismatch" in text.lower()
    assert not peer.mails


def test_tls_demanded_but_not_offered_defers(site):
    site.mx("plain.test", (10, "mx.plain.test", "127.0.0.2"), (20, "mx2.plain.test", "127.0.0.3"))
    site.control("tlspolicy", "plain.test:encrypt\n")
    peers = [site.smtp("127.0.0.2"), site.smtp("127.0.0.3")]
    [(letter, text)] = site.deliver(["a@plain.test"])
    assert (letter, text) == ("Z", "Connected to 127.0.0.3 but it does not offer STARTTLS; "
                                   "TLS is required for plain.test. (#4.7.5)\n")
    assert all(p.connections == 1 and not p.mails for p in peers)  # both tried, neither got mail


def test_tls_demanded_moves_on_to_an_exchanger_that_offers_it(site, cert):
    site.mx("mixed.test", (10, "mx1.mixed.test", "127.0.0.3"), (20, "mx.tls.test", "127.0.0.2"))
    site.control("tlspolicy", "mixed.test:encrypt\n")
    plain = site.smtp("127.0.0.3")
    secure = site.smtp("127.0.0.2", tls=server_context(*cert))
    assert site.deliver(["a@mixed.test"])[0][0] == "K"
    assert not plain.mails and secure.mails[0].tls


def test_policy_none_never_starts_tls(site, cert):
    peer = tls_site(site, cert, policy=":none\n")
    assert site.deliver(["a@tls.test"])[0][0] == "K"
    assert not peer.mails[0].tls and not any(c.startswith(b"STARTTLS") for c in peer.commands)


def test_a_failed_opportunistic_handshake_is_retried_in_cleartext(site):
    site.mx("broken.test", (10, "mx.broken.test", "127.0.0.2"))
    # offers STARTTLS, says 220, then keeps talking cleartext: the handshake fails
    peer = site.smtp("127.0.0.2", extensions=("PIPELINING", "STARTTLS"))
    assert site.deliver(["a@broken.test"])[0][0] == "K"
    assert peer.connections == 2 and not peer.mails[0].tls
    assert any("trying it again without TLS" in line for line in site.log)


def test_starttls_refused_goes_on_in_cleartext_unless_required(site, cert):
    peer = tls_site(site, cert)
    peer.replies["STARTTLS"] = b"454 4.7.0 TLS not available now\r\n"
    assert site.deliver(["a@tls.test"])[0][0] == "K"
    assert not peer.mails[0].tls
    site.control("tlspolicy", "tls.test:encrypt\n")
    [(letter, text)] = site.deliver(["a@tls.test"])
    assert letter == "Z" and "STARTTLS was refused" in text and "454 4.7.0" in text


def test_an_unusable_ca_file_defers_with_a_clear_text(site, cert):
    peer = tls_site(site, cert, policy="tls.test:verify\n")
    with open(site.root.control_dir + "/tlsca.pem", "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    [(letter, text)] = site.deliver(["a@tls.test"])
    assert letter == "Z" and "TLS handshake failed: no TLS settings" in text
    assert not peer.mails
