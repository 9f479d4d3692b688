"""`--ssl-certfile` / `--ssl-keyfile` (vLLM's flags): the router's HTTP front, and its public gRPC front, over TLS;
with `--ssl-ca-certs`, mutual TLS: a client must present a certificate those CAs signed.

Without them both fronts speak plain text, which is right behind a proxy that ends TLS, and on loopback; a
router on a network address otherwise sends the API key and every prompt in the clear. The pair is read and
checked at start-up, before any shard starts, so a wrong path, a key that is not the certificate's or an
encrypted key stops the launch with the reason rather than after the warm-up.
"""

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the launcher reads the pair before grpc is imported (router/launcher.py)
    import grpc


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """A certificate chain and its key (PEM), and the HTTP server's context over them."""

    certificate_chain: bytes
    private_key: bytes
    context: ssl.SSLContext
    # --ssl-ca-certs (PEM): the CAs a client's certificate must be signed by; None: clients present none.
    client_ca: bytes | None = None

    def grpc_credentials(self) -> "grpc.ServerCredentials":
        """The same for the public gRPC front."""
        import grpc

        pair = [(self.private_key, self.certificate_chain)]
        return grpc.ssl_server_credentials(
            pair, root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )


def _no_password() -> bytes:
    # Called only for an encrypted key: without it OpenSSL would prompt on the terminal, and a server waits.
    raise ValueError("the key is encrypted; give it unencrypted (readable by the server's user only)")


def server_tls(certfile: Path | None, keyfile: Path | None, ca_certs: Path | None = None) -> ServerTLS | None:
    """The TLS the fronts serve with (None without the flags), requiring client certificates signed by `ca_certs`
    where given; ValueError naming what is wrong with the files."""
    if certfile is None and keyfile is None:
        if ca_certs is not None:
            raise ValueError("--ssl-ca-certs is for mutual TLS: it needs --ssl-certfile and --ssl-keyfile")
        return None
    if certfile is None or keyfile is None:
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
        chain, key = certfile.read_bytes(), keyfile.read_bytes()
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ValueError(f"--ssl-certfile {certfile} with --ssl-keyfile {keyfile}: {e}") from None
    if ca_certs is None:
        return ServerTLS(chain, key, context)
    try:
        context.load_verify_locations(cafile=ca_certs)
        client_ca = ca_certs.read_bytes()
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl-ca-certs {ca_certs}: {e}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return ServerTLS(chain, key, context, client_ca)
