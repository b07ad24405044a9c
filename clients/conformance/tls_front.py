"""A TLS front for the harness's servers: ``wss://`` with a certificate made at run time.

The harness's ``POST /servers/<id>/tls`` puts one in front of a server: a TLS listener on a
free port of 127.0.0.1 that hands every connection's bytes, decrypted, to the server's plain
port, as an ingress terminating TLS does. Its certificate is signed by a CA this harness made
when it started (``ca.pem``, given to the caller): a client that trusts that CA connects; one
that does not meets an untrusted certificate, and a certificate made for another host name
(``hostname``) is one for the wrong host. Nothing is mocked: the clients' own TLS stacks judge
a real handshake.

A front's certificate can be changed while it runs (:meth:`TlsFront.set_certificate`, the
harness's ``POST /fronts/<front>/certificate``): the next handshakes get the new one, as after
a server's certificate was rotated (wrongly, then rightly), on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A private CA for one run, and the certificates it signs, as PEM files in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name("wschat conformance test CA")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, hostname: str, stem: str) -> tuple[Path, Path]:
        """A server certificate for ``hostname`` (and 127.0.0.1 when it is ``localhost``):
        the paths of its PEM chain and key."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(hostname)]
        if hostname == "localhost":
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hostname)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


class TlsFront:
    """TLS on ``port`` (127.0.0.1), each connection piped to ``127.0.0.1:backend_port``.

    Runs an event loop in a thread of its own; :meth:`close` stops it and every connection.
    """

    def __init__(self, cert: Path, key: Path, backend_port: int) -> None:
        self.context = self.current = _server_context(cert, key)
        # Every handshake takes the certificate that is current when it starts (the callback
        # runs on each ClientHello, with or without a server name in it).
        self.context.sni_callback = self._pick_certificate
        self.backend_port = backend_port
        self.loop = asyncio.new_event_loop()
        # A client refusing the certificate fails the handshake here: what the tests want, not
        # an error to log.
        self.loop.set_exception_handler(lambda loop, context: None)
        self.tasks: set[asyncio.Task[None]] = set()
        started = threading.Event()
        self.server: asyncio.Server | None = None

        async def listen() -> None:
            self.server = await asyncio.start_server(
                self._pipe, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=10)
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(listen())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="tls-front", daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the TLS front did not start")
        assert self.server is not None
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _pick_certificate(self, ssl_object: ssl.SSLObject, server_name: str | None,
                          context: ssl.SSLContext) -> None:
        if self.current is not context:
            ssl_object.context = self.current

    def set_certificate(self, cert: Path, key: Path, drop: bool = False) -> None:
        """Serve ``cert`` from the next handshake on; ``drop``: also cut every connection open
        now (their clients reconnect, and meet the new certificate)."""
        self.current = _server_context(cert, key)
        if drop:
            async def cut() -> None:
                for task in list(self.tasks):
                    task.cancel()

            asyncio.run_coroutine_threadsafe(cut(), self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            self.tasks.discard(task)
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    dst.close()

        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        finally:
            self.tasks.discard(task)

    def close(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            for task in list(self.tasks):
                task.cancel()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def make_ca() -> CertificateAuthority:
    """A CA in a fresh temporary folder (removed by the caller's ``cleanup``)."""
    return CertificateAuthority(Path(tempfile.mkdtemp(prefix="wschat-tls-")))
