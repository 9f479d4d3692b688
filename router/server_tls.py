"""`--ssl-certfile` / `--ssl-keyfile` (vLLM's flags): the router's HTTP front, and its public gRPC front, over TLS.

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

    def grpc_credentials(self) -> "grpc.ServerCredentials":
        """The same pair for the public gRPC front."""
        import grpc

        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])


def _no_password() -> bytes:
    # Called only for an encrypted key: without it OpenSSL would prompt on the terminal, and a server waits.
    raise ValueError("the key is encrypted; give it unencrypted (readable by the server's user only)")


def server_tls(certfile: Path | None, keyfile: Path | None) -> ServerTLS | None:
    """The TLS the fronts serve with (None without the flags); ValueError naming what is wrong with the pair."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
        chain, key = certfile.read_bytes(), keyfile.read_bytes()
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ValueError(f"--ssl-certfile {certfile} with --ssl-keyfile {keyfile}: {e}") from None
    return ServerTLS(chain, key, context)
