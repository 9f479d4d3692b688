"""The streaming fronts when the client goes away between two events (router/http_common.stream_sse) or
two tokens (/predict's text stream): no error answered or logged as the server's, and the generation
behind the stream closed (its requests cancelled)."""

import contextlib
import logging
from types import SimpleNamespace
from unittest import mock

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mixserve.router.api_predict import stream_text
from mixserve.router.http_common import stream_sse


@contextlib.contextmanager
def _client_leaves_at_the_second_write(writes: list, caplog):
    """StreamResponse prepared at once, recording each write, raising at the second as aiohttp's writer
    does on a transport the client closed."""

    async def write(self, data):
        writes.append(data)
        if len(writes) == 2:
            raise ConnectionResetError("Cannot write to closing transport")

    with (
        mock.patch.object(web.StreamResponse, "prepare", autospec=True),
        mock.patch.object(web.StreamResponse, "prepared", new_callable=mock.PropertyMock, return_value=True),
        mock.patch.object(web.StreamResponse, "write", write),
        caplog.at_level(logging.INFO, logger="mixserve.router"),
    ):
        yield


async def test_a_client_gone_mid_stream_closes_the_payloads_and_is_no_server_error(caplog):
    closed = []

    async def payloads():
        try:
            yield {"token": 1}
            yield {"token": 2}
            yield {"token": 3}
        finally:
            closed.append(True)

    writes = []
    with _client_leaves_at_the_second_write(writes, caplog):
        response = await stream_sse(make_mocked_request("POST", "/v1/chat/completions"), payloads(), str)
    assert isinstance(response, web.StreamResponse)
    assert len(writes) == 2 and closed == [True]
    assert "event=client_gone" in caplog.text and "internal" not in caplog.text


async def test_predicts_text_stream_meets_a_client_gone_the_same_way(caplog):
    closed = []

    class Generation:
        id, generated_tokens = "req-1", 2

        def stream(self):
            async def events():
                try:
                    for text in ("a", "b", "c"):
                        yield SimpleNamespace(text=text)
                finally:
                    closed.append(True)

            return events()

    writes = []
    with _client_leaves_at_the_second_write(writes, caplog):
        response = await stream_text(make_mocked_request("POST", "/predict"), Generation())
    assert isinstance(response, web.StreamResponse)
    assert writes == [b"a", b"b"] and closed == [True]
    assert "event=client_gone" in caplog.text and "internal" not in caplog.text
