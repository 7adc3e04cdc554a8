"""Automatic certificates from an ACME CA (Let's Encrypt by default) with certbot's `acme` library.

The protocol calls block, so they run in a worker thread; the event loop only keeps the HTTP-01
answers (`challenges`, read by the plain-HTTP listener) and the renewal schedule. Until the first
certificate arrives the HTTPS listener serves a self-signed placeholder, so nothing waits for the CA.

Files in `data_dir/acme/`: `account.key`, `key.pem` (0600) and `cert.pem` (full chain).
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import logging
import ssl
from pathlib import Path

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy.jwk import JWKRSA

from cargohold import __version__
from cargohold.config import AcmeConfig
from cargohold.tls.context import CertReloader, server_context, write_private

log = logging.getLogger("cargohold.acme")

RENEW_AT = 2 / 3  # of the certificate's lifetime
RETRY_FIRST = 60.0  # seconds after the first failure, doubled each time (stays under CA failure limits)
RETRY_MAX = 3600.0
ORDER_TIMEOUT = 120.0  # seconds for the CA to validate and issue


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def renewal_time(cert_pem: bytes) -> datetime.datetime:
    """When a certificate is due: two thirds into its lifetime."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AT


def cert_names(cert_pem: bytes) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName))


class AcmeManager:
    """Obtains the certificate for the configured domains and renews it, never on the request path."""

    def __init__(self, config: AcmeConfig, directory: Path, *, retry_first: float = RETRY_FIRST) -> None:
        self.config = config
        self.dir = directory
        self.account_key_path = directory / "account.key"
        self.cert_path = directory / "cert.pem"
        self.key_path = directory / "key.pem"
        self.retry_first = retry_first
        # HTTP-01 token -> key authorization; written by the worker thread, read by the listener.
        self.challenges: dict[str, str] = {}

    def has_certificate(self) -> bool:
        """A stored pair that loads, for exactly the configured names (else one is ordered at once)."""
        try:
            server_context(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError):  # missing, or a crash between writing the key and the chain
            return False
        return cert_names(self.cert_path.read_bytes()) == set(self.config.domains)

    def placeholder(self) -> tuple[Path, Path]:
        """A self-signed certificate to listen with until the CA has issued the real one; made under a
        lock, and kept while it fits, so that workers starting together all load one matching pair."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_file, key_file = self.dir / "placeholder-cert.pem", self.dir / "placeholder-key.pem"
        with open(self.dir / "placeholder.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._fits(cert_file, key_file):
                self._write_placeholder(cert_file, key_file)
        return cert_file, key_file

    def _fits(self, cert_file: Path, key_file: Path) -> bool:
        """A pair that loads, for exactly the configured names, not yet due for renewal."""
        try:
            server_context(cert_file, key_file)
            pem = cert_file.read_bytes()
        except (OSError, ssl.SSLError):
            return False
        return cert_names(pem) == set(self.config.domains) and renewal_time(pem) > _now()

    def _write_placeholder(self, cert_file: Path, key_file: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.config.domains[0])])
        now = _now()
        cert_pem = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in self.config.domains]), False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        write_private(key_file, _pem(key))
        write_private(cert_file, cert_pem, 0o644)

    def next_due(self) -> datetime.datetime:
        """When to order next: now without a fitting certificate, else at two thirds of its lifetime."""
        if not self.has_certificate():
            return _now()
        return renewal_time(self.cert_path.read_bytes())

    async def run(self, reloader: CertReloader) -> None:
        """Forever: wait until due, order in a worker thread, serve the result; back off on failure."""
        loop = asyncio.get_running_loop()
        retry = self.retry_first
        while True:
            wait = (self.next_due() - _now()).total_seconds()
            if wait > 0:
                log.info("ACME certificate for %s renews at %s", ", ".join(self.config.domains), self.next_due())
                await asyncio.sleep(wait)
            try:
                await loop.run_in_executor(None, self.obtain)
                reloader.use(self.cert_path, self.key_path)
            except Exception as exc:  # noqa: BLE001 - a CA failure must never end the schedule
                log.warning("ACME order from %s failed, retrying in %.1fs: %s", self.config.directory, retry, exc)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
            else:
                retry = self.retry_first
            finally:
                self.challenges.clear()

    async def follow(self, reloader: CertReloader, interval: float) -> None:
        """In a worker that is not the leader: serve the certificate the leader's `run` stores, forever."""
        while True:
            await asyncio.sleep(interval)
            if reloader.files == (self.cert_path, self.key_path):
                reloader.reload_if_changed()
            elif self.has_certificate():
                try:
                    reloader.use(self.cert_path, self.key_path)
                except (OSError, ssl.SSLError) as exc:  # caught between the leader's two writes: next time
                    log.info("ACME certificate not loaded yet: %s", exc)

    def obtain(self) -> None:
        """Blocking: register (or find) the account, order, answer HTTP-01, finalize, store key and chain."""
        acme = self._client()
        # ECDSA P-256: small, fast, accepted by every CA and client.
        key_pem = _pem(ec.generate_private_key(ec.SECP256R1()))
        order = acme.new_order(crypto_util.make_csr(key_pem, self.config.domains))
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue
            chall = self._http01(authz)
            response, validation = chall.response_and_validation(acme.net.key)
            self.challenges[chall.chall.encode("token")] = validation
            acme.answer_challenge(chall, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)  # noqa: DTZ005  # acme compares with naive now()
        order = acme.poll_and_finalize(order, deadline)
        # Were the process to die between the two writes, the pair would not load: has_certificate() says so.
        write_private(self.key_path, key_pem)
        write_private(self.cert_path, order.fullchain_pem.encode(), 0o644)
        log.info("ACME certificate for %s issued by %s", ", ".join(self.config.domains), self.config.directory)

    @staticmethod
    def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
        for chall in authz.body.challenges:
            if isinstance(chall.chall, challenges.HTTP01):
                return chall
        raise errors.Error(f"the CA offers no http-01 challenge for {authz.body.identifier.value}")

    def _client(self) -> client.ClientV2:
        verify: bool | str = str(self.config.ca_bundle) if self.config.ca_bundle else True
        net = client.ClientNetwork(
            self._account_key(),
            verify_ssl=verify,  # type: ignore[arg-type]  # acme types it bool; requests also takes a CA bundle path
            user_agent=f"cargohold/{__version__}",
        )
        acme = client.ClientV2(client.ClientV2.get_directory(self.config.directory, net), net)
        registration = messages.NewRegistration.from_data(email=self.config.email, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:  # the key already has an account: use it
            acme.query_registration(messages.RegistrationResource(uri=exc.location, body=messages.Registration()))
        return acme

    def _account_key(self) -> JWKRSA:
        """The account key, created once (RSA 2048: what every ACME CA accepts for accounts)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.account_key_path.exists():
            write_private(self.account_key_path, _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
        loaded = serialization.load_pem_private_key(self.account_key_path.read_bytes(), None)
        return JWKRSA(key=loaded)
