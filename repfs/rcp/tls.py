"""TLS for the site's one port (RCP and the control API) and for its clients (docs/security.md).

site.toml::

    [tls]
    cert = "/etc/repfs/tls/s1.pem"   # this site's certificate (signed by the CA)
    key = "/etc/repfs/tls/s1.key"    # its private key (mode 0600)
    ca = "/etc/repfs/tls/ca.pem"     # the CA that signs every site's (and admin's) certificate

All three or none (a relative path is relative to the site directory). With them the daemon's
port speaks TLS only, and every peer must present a certificate signed by the CA (mutual
TLS, for RCP and HTTP alike: the bearer token and the group secrets are still checked inside).
The files are checked when the site is mounted (`load`), each problem refused in one line.

Clients: `client_context` (a site's files, or repfs-admin's --tls-* options) verifies the
server against the CA only and presents the client's certificate; `wrap` checks the server's
certificate names the HOST that was dialled (subjectAltName: DNS names and IP addresses),
or, for a site on this host reached through its control.json (`pin`), that the server is
that very site (its own certificate, byte for byte).

`init` makes a CA and per-site certificates for people who have none (`repfs-admin tls init`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

TLS_RECORD = 0x16  # the first byte of a TLS handshake record (a ClientHello)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOST_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})"
                     r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


class TlsError(Exception):
    """A TLS setting or file that cannot be used (one line)."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


def files_of(cfg: dict, site_path: Path, where: str) -> TlsFiles | None:
    """site.toml's [tls] section (`cfg`: the whole parsed file) -> its files, or None when
    there is none. TlsError for a partial or malformed section (`where`: the file's name)."""
    sec = cfg.get("tls")
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise TlsError(f"{where}: [tls] must be a table with cert, key and ca")
    keys = ("cert", "key", "ca")
    unknown = sorted(set(sec) - set(keys))
    if unknown:
        raise TlsError(f"{where}: unknown [tls] setting {unknown[0]!r} (cert, key, ca)")
    missing = [k for k in keys if k not in sec]
    if missing:
        raise TlsError(f"{where}: [tls] needs cert, key and ca (all three or no [tls]); "
                       f"{', '.join(missing)} missing")
    paths = []
    for k in keys:
        v = sec[k]
        if not isinstance(v, str) or not v or "\0" in v:
            raise TlsError(f"{where}: bad [tls] {k} {v!r}: want a file's path")
        paths.append(Path(site_path) / v)  # (an absolute v stays as it is)
    return TlsFiles(*paths)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"[tls] {what} {path} does not exist") from None
    except IsADirectoryError:
        raise TlsError(f"[tls] {what} {path} is a directory, not a PEM file") from None
    except OSError as e:
        raise TlsError(f"[tls] {what} {path} cannot be read: {e.strerror or e}") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _cert(path: Path, what: str):
    from cryptography import x509
    raw = _read(path, what)
    try:
        cert = x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise TlsError(f"[tls] {what} {path} is not a PEM certificate") from None
    now = _now()
    if cert.not_valid_after_utc < now:
        raise TlsError(f"[tls] {what} {path} expired on "
                       f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise TlsError(f"[tls] {what} {path} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return cert


def check(files: TlsFiles) -> None:
    """Each file readable and PEM, the key the certificate's, no certificate expired, the
    certificate signed by the CA; TlsError (one line) otherwise."""
    from cryptography.hazmat.primitives import serialization
    cert = _cert(files.cert, "cert")
    ca = _cert(files.ca, "ca")
    raw = _read(files.key, "key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise TlsError(f"[tls] key {files.key} is encrypted (a daemon cannot ask for its "
                       f"password): store it unencrypted, mode 0600") from None
    except Exception as e:  # noqa: BLE001 - ValueError, and unsupported key types
        raise TlsError(f"[tls] key {files.key} is not a PEM private key "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*pub) != cert.public_key().public_bytes(*pub):
        raise TlsError(f"[tls] key {files.key} does not match cert {files.cert} (another "
                       f"certificate's key?)")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError
        raise TlsError(f"[tls] cert {files.cert} is not signed by ca {files.ca}") from None


def _context(purpose, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The daemon's: its certificate, and a CA-signed certificate required of every peer."""
    check(files)
    try:
        ctx = _context(ssl.Purpose.CLIENT_AUTH, files)
        # no TLS 1.3 session tickets: nothing resumes sessions, and a ticket arriving on an
        # idle client connection would make it look closed (RcpConnection.alive polls it)
        ctx.num_tickets = 0
        return ctx
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"[tls] cannot be used: {reason(e)}") from None


def client_context(files: TlsFiles, *, pinned: bool = False) -> ssl.SSLContext:
    """A client's: trusts the CA alone, presents the client's certificate; `pinned`: for
    `wrap(pin=...)` (no host name check: the pin checks more than a name would)."""
    try:
        ctx = _context(ssl.Purpose.SERVER_AUTH, files)
        ctx.check_hostname = not pinned
        return ctx
    except FileNotFoundError as e:
        raise TlsError(f"TLS: {e.filename} does not exist") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"TLS files {files.cert}, {files.key}, {files.ca} cannot be used: "
                       f"{reason(e)}") from None


def load(site_path: Path, cfg: dict, where: str) -> ssl.SSLContext | None:
    """The server context of a site's [tls] (None without one), checked; TlsError."""
    files = files_of(cfg, site_path, where)
    if files is None:
        return None
    try:
        return server_context(files)
    except TlsError as e:
        raise TlsError(f"{where}: {e}") from None


def site_files(site_path: Path) -> TlsFiles | None:
    """The [tls] files of the site at `site_path` (its site.toml), None without; TlsError."""
    import tomllib
    path = Path(site_path) / "site.toml"
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TlsError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    return files_of(cfg, Path(site_path), str(path))


def site_client(site_path: Path) -> tuple[ssl.SSLContext, bytes] | None:
    """For a client on the host of the site at `site_path`, reaching its daemon through its
    control.json: a context from the site's [tls] and the site's own certificate (DER, for
    `wrap`'s pin); None when the site has no [tls]. TlsError."""
    files = site_files(site_path)
    if files is None:
        return None
    ctx = client_context(files, pinned=True)
    return ctx, ssl.PEM_cert_to_DER_cert(_read(files.cert, "cert").decode("ascii", "replace"))


def reason(e: BaseException) -> str:
    """A one-line reason from an ssl error (what OpenSSL says, made readable)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        r = e.reason or ""
        known = {
            "HTTP_REQUEST": "plain HTTP to a TLS port",
            "WRONG_VERSION_NUMBER": "not TLS (plain text to a TLS port?)",
            "UNKNOWN_PROTOCOL": "not TLS",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer presented no certificate",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate and we "
                                                 "presented none",
            "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
            "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate expired",
            "KEY_VALUES_MISMATCH": "the key does not match the certificate",
        }
        if r in known:
            return f"{known[r]} ({r.lower()})"
        return (r.lower().replace("_", " ") if r else str(e)) or type(e).__name__
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


def wrap(sock: socket.socket, ctx: ssl.SSLContext, host: str, *, pin: bytes | None = None,
         timeout: float) -> ssl.SSLSocket:
    """`sock` (connected, blocking with a timeout) after a TLS handshake: the server's
    certificate must be signed by the CA and name `host` (the HOST dialled), or, with
    `pin`, be exactly that certificate (a site on this host, reached by its directory).
    OSError (ssl.SSLError: its `reason` says why) when it fails; `sock` is then closed."""
    if (pin is not None) == ctx.check_hostname:
        raise ValueError("a pinned connection wants client_context(pinned=True), only it")
    try:
        sock.settimeout(timeout)
        tls = ctx.wrap_socket(sock, server_hostname=None if pin is not None else host)
    except BaseException:
        sock.close()
        raise
    if pin is not None and tls.getpeercert(binary_form=True) != pin:
        tls.close()
        raise ssl.SSLError(f"certificate verify failed: the daemon at {host} presents "
                           f"another certificate than its site's [tls] cert")
    return tls


# ----------------------------------------------------------------------------- tls init

def _valid_host(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return bool(HOST_RE.fullmatch(h))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def init(directory: str | os.PathLike, name: str, hosts: list[str], *, days: int = 825
         ) -> tuple[bool, TlsFiles]:
    """Make DIR/ca.pem + ca.key (if DIR has no CA) and DIR/NAME.pem + NAME.key signed by it,
    for `hosts` (subjectAltName: DNS names, IP addresses). Never overwrites a file. Returns
    (whether the CA was made, the site's files). TlsError (one line) for bad input."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    d = Path(directory)
    if not NAME_RE.fullmatch(name) or name.lower() == "ca":
        raise TlsError(f"bad site name {name!r}: 1-64 letters, digits, '.', '_', '-' "
                       "(not 'ca')")
    if not hosts:
        raise TlsError("--host needs at least one host name or IP address")
    for h in hosts:
        if not _valid_host(h):
            raise TlsError(f"bad host {h!r}: want a DNS name or an IP address")
    if not 1 <= days <= 36500:
        raise TlsError(f"bad --days {days}: want 1 to 36500")
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise TlsError(f"cannot make {d}: {e.strerror or e}") from None
    if not d.is_dir():
        raise TlsError(f"{d} is not a directory")
    ca_pem, ca_key_path = d / "ca.pem", d / "ca.key"
    files = TlsFiles(d / f"{name}.pem", d / f"{name}.key", ca_pem)
    for p in (files.cert, files.key):
        if p.exists():
            raise TlsError(f"{p} exists (never overwritten): pick another --site-name or "
                           "remove it")
    pem = serialization.Encoding.PEM
    now = _now() - datetime.timedelta(minutes=5)
    made_ca = False
    if ca_pem.exists() or ca_key_path.exists():
        if not (ca_pem.exists() and ca_key_path.exists()):
            raise TlsError(f"{d} holds only one of ca.pem and ca.key: cannot sign with it "
                           "(restore the other, or use another directory)")
        ca = _cert(ca_pem, "ca")
        try:
            ca_key = serialization.load_pem_private_key(_read(ca_key_path, "ca key"), None)
        except (ValueError, TypeError) as e:
            raise TlsError(f"{ca_key_path} is not an unencrypted PEM private key "
                           f"({e})") from None
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "repfs CA"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "repfs")])
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(
                  digital_signature=False, content_commitment=False, key_encipherment=False,
                  data_encipherment=False, key_agreement=False, key_cert_sign=True,
                  crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .add_extension(ski, critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write_new(ca_key_path, ca_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
        _write_new(ca_pem, ca.public_bytes(pem), 0o644)
        made_ca = True
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    not_after = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_new(files.key, key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write_new(files.cert, cert.public_bytes(pem), 0o644)
    return made_ca, TlsFiles(files.cert.resolve(), files.key.resolve(), ca_pem.resolve())
