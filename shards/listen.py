"""Where a shard listens, and who may call it: a unix socket, or TCP with a shared token and/or TLS.

A unix socket is owner-only, so only its user can call. On TCP anyone who reaches the port could
send steps, so a shard bound to a non-loopback address needs a token (sent by the router as
`authorization: Bearer TOKEN` metadata on every call), TLS, or an explicit `--insecure`. The token
authenticates the caller, TLS hides the traffic (it does not check who calls): both together on a
network you do not trust.
"""

import argparse
import hashlib
import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_METADATA_KEY = "authorization"


class ListenError(ValueError):
    """The shard cannot listen as asked (reason in the message)."""


@dataclass(slots=True, frozen=True)
class ListenConfig:
    """A unix socket path, or a TCP host and port, with the credentials TCP callers must bring."""

    uds: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.uds is None) == (self.port is None):
            raise ListenError("give exactly one of a unix socket path or a TCP port")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ListenError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ListenError(f"TLS file {path} does not exist")
        if self.tls_cert is not None and self.uds is not None:
            raise ListenError("TLS is for TCP (--port); a unix socket is owner-only instead")
        if self.token is not None and not self.token:
            raise ListenError("the shard token is empty")
        if self.port is not None and not (self.token or self.tls_cert or self.insecure or is_loopback(self.host)):
            raise ListenError(
                f"refusing to listen on {self.host}:{self.port} with neither a shard token nor TLS: anyone who "
                "reaches the port could drive the model; set --shard-token (or MIXSERVE_SHARD_TOKEN) and/or "
                "--tls-cert/--tls-key, or pass --insecure on a network you trust"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, local_rank: int) -> "ListenConfig":
        """From the `mixserve shard` flags; with --port P this process listens on P + `local_rank`, so one
        command line serves every process torchrun starts on a host."""
        return cls(
            uds=args.uds,
            host=args.host,
            port=None if args.port is None else args.port + local_rank,
            token=args.shard_token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            insecure=args.insecure,
        )

    @property
    def address(self) -> str:
        """The gRPC address to bind: `unix:PATH` or `host:port`."""
        if self.uds is not None:
            return f"unix:{self.uds}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The token check, when a token is set (unix socket or TCP alike)."""
        return [TokenInterceptor(self.token)] if self.token else []

    def bind(self, server: grpc.Server) -> str:
        """Add this port to `server` and start it; returns the address it listens on."""
        if self.uds is not None:
            old_umask = os.umask(0o077)
            try:
                server.add_insecure_port(self.address)
                server.start()
            finally:
                os.umask(old_umask)
            os.chmod(self.uds, 0o600)
            return self.address
        if self.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(self.tls_key.read_bytes(), self.tls_cert.read_bytes())])
            bound = server.add_secure_port(self.address, credentials)
        else:
            bound = server.add_insecure_port(self.address)
        if bound == 0:
            raise ListenError(f"could not bind {self.address} (in use, or not an address of this host)")
        server.start()
        return self.address

    def describe(self) -> str:
        """key=value words for the serving log line (never the token itself)."""
        return f"tls={self.tls_cert is not None} token={bool(self.token)} insecure={self.insecure}"


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (so only this host can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose `authorization` metadata is not `Bearer TOKEN`.

    The comparison is of SHA-256 digests with hmac.compare_digest: constant time in the content and
    the same length whatever was sent.
    """

    def __init__(self, token: str) -> None:
        self._expected = _digest(f"Bearer {token}")

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong shard token")

        # One refusal per kind of method (request streaming?, response streaming?): the handler must
        # be of the kind the method is, e.g. DecodeSteps answers a stream.
        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if handler is None or hmac.compare_digest(_digest(sent), self._expected):
            return handler
        return self._deny[handler.request_streaming, handler.response_streaming]


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mixserve shard` flags for where it listens and what TCP callers must bring."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uds", help="listen on this unix socket path (owner-only permissions)")
    where.add_argument(
        "--port", type=int, help="listen on this TCP port plus $LOCAL_RANK (as torchrun sets it; 0 when unset)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="TCP address to bind with --port")
    parser.add_argument(
        "--shard-token",
        default=os.environ.get("MIXSERVE_SHARD_TOKEN") or None,
        help="require this token from callers (gRPC metadata authorization: Bearer TOKEN); "
        "default: $MIXSERVE_SHARD_TOKEN",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate (chain) with --port")
    parser.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host with neither a token nor TLS (a network you trust)",
    )
