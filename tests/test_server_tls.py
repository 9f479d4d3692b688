"""`--ssl-certfile` / `--ssl-keyfile` (router/server_tls.py): the HTTP and public gRPC fronts over TLS, and the
pairs refused at start-up with the reason."""

import shutil
import ssl
import subprocess

import aiohttp
import grpc
import openai
import pytest
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from child_processes import PYTHON, free_port, subprocess_env
from mixserve.router.server_tls import server_tls
from mixserve_pb import generate_pb2, generate_pb2_grpc


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_a_pair_is_checked_before_anything_starts(tls, tmp_path):
    cert, key = tls
    assert server_tls(None, None) is None
    served = server_tls(cert, key)
    assert served.certificate_chain == cert.read_bytes() and served.private_key == key.read_bytes()
    with pytest.raises(ValueError, match="go together"):
        server_tls(cert, None)
    with pytest.raises(ValueError, match="No such file"):
        server_tls(cert, tmp_path / "missing.pem")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the other keys")
    other = tmp_path / "other.pem"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(other))
    with pytest.raises(ValueError, match=f"--ssl-certfile {cert} with --ssl-keyfile {other}"):
        server_tls(cert, other)  # not the certificate's key
    encrypted = tmp_path / "encrypted.pem"
    openssl("pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted))
    with pytest.raises(ValueError, match="the key is encrypted"):
        server_tls(cert, encrypted)  # never a prompt on the terminal


@pytest.mark.slow
def test_the_launch_stops_at_a_bad_pair(tls):
    cert, _ = tls
    done = subprocess.run(
        [PYTHON, "-m", "mixserve.cli", "launch", "--port", str(free_port()), "--ssl-certfile", str(cert)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "--ssl-certfile and --ssl-keyfile go together" in done.stderr


@pytest.mark.slow
async def test_https_and_grpc_over_tls(launch, demo_dir, tls):
    cert, key = tls
    grpc_port = free_port()
    server = launch(
        "--model", str(demo_dir), "--num-shard", "1", "--grpc-port", str(grpc_port),
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
    )  # fmt: skip
    assert server.url.startswith("https://")
    # The OpenAI client over https, trusting the certificate: a streamed chat.
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=ssl.create_default_context(cafile=str(cert)), timeout=120),
    )  # fmt: skip
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    async with aiohttp.ClientSession() as session:
        # Plain text to the same port gets no answer; https without trusting the certificate is refused.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{server.port}/health") as response:
                await response.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(f"{server.url}/health") as response:
                await response.read()
    # The public gRPC front over the same certificate.
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
        request = generate_pb2.GenerateRequest(prompt="The old river", parameters=generate_pb2.GenerationParameters())
        request.parameters.max_new_tokens = 3
        answer = await generate_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=120)
        assert answer.generated_tokens == 3
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    server.stop()  # free the CPU for the modules after this one


@pytest.fixture
def client_certificates(tmp_path):
    """A CA, and a client certificate it signed (PEM files)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the certificates")
    ca_key, ca, key, request, signed = (tmp_path / n for n in ("ca.key", "ca.pem", "c.key", "c.csr", "c.pem"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client", "-keyout", str(key), "-out", str(request))
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-out", str(signed))  # fmt: skip
    return ca, signed, key


async def test_mutual_tls_takes_only_clients_the_ca_signed(tls, client_certificates):
    """--ssl-ca-certs: the HTTP site's context and the gRPC credentials the launcher builds take a client whose
    certificate the CA signed, and refuse one without a certificate or with one the CA did not sign."""
    cert, key = tls
    ca, client_cert, client_key = client_certificates
    with pytest.raises(ValueError, match="needs --ssl-certfile and --ssl-keyfile"):
        server_tls(None, None, ca)
    with pytest.raises(ValueError, match=f"--ssl-ca-certs {key}"):
        server_tls(cert, key, key)  # a key is no CA certificate
    served = server_tls(cert, key, ca)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=served.context).start()
    grpc_port = free_port()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_secure_port(f"127.0.0.1:{grpc_port}", served.grpc_credentials())
    await server.start()
    try:
        clients = {"signed": (client_cert, client_key), "none": None, "stranger": (cert, key)}
        for name, pair in clients.items():
            context = ssl.create_default_context(cafile=str(cert))
            if pair is not None:
                context.load_cert_chain(*pair)
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.get(f"https://localhost:{port}/", ssl=context) as response:
                        answered = response.status == 200 and await response.json() == {"ok": True}
                except aiohttp.ClientError:
                    answered = False
            assert answered == (name == "signed"), name
            chain, private = (None, None) if pair is None else (pair[0].read_bytes(), pair[1].read_bytes())
            keys = {} if pair is None else {"certificate_chain": chain, "private_key": private}
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes(), **keys)
            async with grpc.aio.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    checked = True
                except grpc.aio.AioRpcError:
                    checked = False
            assert checked == (name == "signed"), name
    finally:
        await server.stop(None)
        await runner.cleanup()
