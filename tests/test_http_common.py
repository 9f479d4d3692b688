"""The streaming fronts when the client goes away between two events (router/http_common.stream_sse) or
two tokens (/predict's text stream), or after the last one, before the stream's end: no error answered
or logged as the server's, and the generation behind the stream closed (its requests cancelled)."""

import contextlib
import logging
from types import SimpleNamespace
from unittest import mock

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mixserve.router.api_predict import stream_text
from mixserve.router.http_common import stream_sse


@contextlib.contextmanager
def _client_leaves_at_the_second_write(writes: list, caplog, at: int = 2):
    """StreamResponse prepared at once, recording each write (the stream's end as b"EOF"), raising at the
    `at`-th as aiohttp's writer does on a transport the client closed."""

    async def write(self, data):
        writes.append(data)
        if len(writes) == at:
            raise ConnectionResetError("Cannot write to closing transport")

    async def write_eof(self, data=b""):
        await write(self, b"EOF")

    with (
        mock.patch.object(web.StreamResponse, "prepare", autospec=True),
        mock.patch.object(web.StreamResponse, "prepared", new_callable=mock.PropertyMock, return_value=True),
        mock.patch.object(web.StreamResponse, "write", write),
        mock.patch.object(web.StreamResponse, "write_eof", write_eof),
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


async def test_a_client_gone_after_the_last_event_is_no_server_error_either(caplog):
    """The soak found it: a stream whose client left as its last events were written failed at the
    stream's end, logged and counted as a 500."""

    async def payloads():
        yield {"token": 1}
        yield {"token": 2}

    writes = []
    with _client_leaves_at_the_second_write(writes, caplog, at=3):
        response = await stream_sse(make_mocked_request("POST", "/v1/chat/completions"), payloads(), str)
    assert isinstance(response, web.StreamResponse) and writes[-1] == b"EOF"
    assert "event=client_gone" in caplog.text and "internal" not in caplog.text

    class Generation:
        id, generated_tokens = "req-1", 2

        def stream(self):
            async def events():
                for text in ("a", "b"):
                    yield SimpleNamespace(text=text)

            return events()

    writes.clear()
    caplog.clear()
    with _client_leaves_at_the_second_write(writes, caplog, at=3):
        response = await stream_text(make_mocked_request("POST", "/predict"), Generation())
    assert writes == [b"a", b"b", b"EOF"] and "event=client_gone" in caplog.text
