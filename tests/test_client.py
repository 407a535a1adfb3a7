"""The load generator: TTFT taken on arrival of the first token, failures as rows, auth."""

import json
import time
import types

import pytest
import requests
from conftest import free_port, make_cfg, ready, rx


@pytest.fixture
def live_server(fake_gpu, tmp_path, monkeypatch):
    servers = []

    def start(spec_kvcached=True, **cfg_overrides):
        cfg = make_cfg(**cfg_overrides)
        spec = rx.ServerSpec(
            "A",
            "Qwen/Qwen2.5-0.5B-Instruct",
            cfg.port_a,
            kvcached=spec_kvcached,
            gpu_memory_utilization=None if spec_kvcached else 0.5,
        )
        server = rx.start_server(cfg, spec, tmp_path / "server.log")
        servers.append(server)
        ready(server)
        return cfg, server

    yield start
    for server in servers:
        rx.stop_servers([server], "end of test", grace_s=2)


def one_request(tokens=32):
    return rx.PlannedRequest(burst=0, index=0, prompt="hello there", max_tokens=tokens, temperature=0.0)


def blank_record():
    return rx.RequestRecord("t", "A", "p", 0, 0, 0, 0.0)


class ScriptedClock:
    """time.perf_counter for the harness: the scripted response moves it to each chunk's arrival."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedTime:
    """The harness's `time` module with a scripted perf_counter (this process's own clock untouched)."""

    def __init__(self, clock):
        self.perf_counter = clock

    def __getattr__(self, name):
        return getattr(time, name)


class ScriptedResponse:
    """A streamed HTTP 200 whose chunks arrive at scripted perf_counter times; the connection closes
    with the last one."""

    status_code = 200
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Transfer-Encoding": "chunked"}
    text = ""

    def __init__(self, clock, chunks):
        self.clock, self.chunks = clock, chunks
        self.raw = types.SimpleNamespace(connection=None)
        self.chunk_sizes, self.closed = [], False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def iter_content(self, chunk_size=1, decode_unicode=False):
        self.chunk_sizes.append(chunk_size)
        for t, data in self.chunks:
            self.clock.now = t
            yield data

    def close(self):
        self.closed = True


class ScriptedSession:
    def __init__(self, response):
        self.response, self.posts = response, []

    def post(self, url, **kwargs):
        self.posts.append((url, kwargs))
        return self.response


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def token_event(content, finish=None):
    return sse(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}],
        }
    )


def test_ttft_is_taken_when_the_first_token_arrives(monkeypatch):
    # Sent at t=0; the role chunk (no content) at 1/16 s, the first token at 0.25 s, then 39 tokens
    # 1/32 s apart, usage with the last one, [DONE] 1/64 s later. Binary fractions: exact.
    clock = ScriptedClock()
    monkeypatch.setattr(rx, "time", ScriptedTime(clock))
    first, gap, tokens = 0.25, 1 / 32, 40
    last = first + (tokens - 1) * gap
    chunks = [(1 / 16, token_event({"role": "assistant", "content": ""}))]
    chunks += [
        (first + i * gap, token_event({"content": "tok "}, "length" if i == tokens - 1 else None))
        for i in range(tokens)
    ]
    chunks += [
        (
            last,
            sse(
                {
                    "id": "c",
                    "choices": [],
                    "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
                }
            ),
        ),
        (last + 1 / 64, b"data: [DONE]\n\n"),
    ]
    response = ScriptedResponse(clock, chunks)
    session = ScriptedSession(response)
    record = rx.send_chat(
        "http://fake", "m", one_request(tokens), blank_record(), ignore_eos=True, session=session
    )
    assert record.ok, record.error
    assert record.ttft_s == first, "the first content chunk, not the role chunk nor the end of the stream"
    assert record.itl_s == [gap] * (tokens - 1)
    assert record.e2e_s == last + 1 / 64
    assert (
        record.completion_tokens == tokens and record.prompt_tokens == 12 and record.finish_reason == "length"
    )
    assert record.content_reads == tokens
    # read as it arrives: a streamed request, each chunk as it comes (chunk_size=None), no buffered body
    ((url, kwargs),) = session.posts
    assert url == "http://fake/v1/chat/completions" and kwargs["stream"] is True
    assert kwargs["json"]["stream"] is True and kwargs["json"]["max_tokens"] == tokens
    assert response.chunk_sizes == [None] and response.closed


def median_ttft(server, tokens, runs=3):
    session = requests.Session()
    rx.send_chat(server.url, server.spec.model, one_request(2), blank_record(), session=session)  # connect
    records = [
        rx.send_chat(
            server.url,
            server.spec.model,
            one_request(tokens),
            blank_record(),
            ignore_eos=True,
            session=session,
        )
        for _ in range(runs)
    ]
    assert all(r.ok for r in records), [r.error for r in records]
    return rx.percentile([r.ttft_s for r in records], 50), records


def test_ttft_on_a_real_socket_follows_the_servers_first_token(live_server, monkeypatch):
    # The same fake server twice, first token at once and after 0.2 s, then 8 tokens 40 ms apart: over
    # real sockets the first token arrives after the server's 0.2 s and long before the stream ends (a
    # buffered read would add the whole stream, 0.28 s, to the TTFT and leave no gaps between tokens).
    delay, itl, tokens = 0.2, 0.04, 8
    stream = (tokens - 1) * itl
    monkeypatch.setenv("FAKE_ITL_S", str(itl))
    monkeypatch.setenv("FAKE_TTFT_S", "0.0")
    _, instant = live_server()
    monkeypatch.setenv("FAKE_TTFT_S", str(delay))
    _, delayed = live_server()
    base, _ = median_ttft(instant, 2)  # the first token at once: the stream's length does not matter
    ttft, records = median_ttft(delayed, tokens)
    assert ttft >= delay, "not before the server sent it"
    assert delay / 2 < ttft - base < delay + stream / 2, "the server's delay, not the stream's length"
    for record in records:
        assert record.completion_tokens == tokens and len(record.itl_s) == tokens - 1
        assert record.ttft_s >= delay and record.e2e_s >= delay + stream
        assert record.ttft_s < record.e2e_s - stream / 2, "TTFT well before the end of the stream"
        # each gap at least half the server's (a late read can shorten the one after it), at most 10x
        assert itl / 2 < rx.percentile(record.itl_s, 50) < 10 * itl
        assert sum(record.itl_s) >= stream / 2


def test_failures_are_rows_not_exceptions(live_server):
    cfg, server = live_server()
    unknown_model = rx.send_chat(server.url, "no-such-model", one_request(), blank_record())
    assert not unknown_model.ok and unknown_model.status == 404 and "404" in unknown_model.error
    too_long = rx.send_chat(server.url, server.spec.model, one_request(10_000), blank_record())
    assert not too_long.ok and too_long.status == 400
    refused = rx.send_chat(f"http://127.0.0.1:{free_port()}", "m", one_request(), blank_record())
    assert not refused.ok and refused.status is None and "ConnectionError" in refused.error
    assert refused.e2e_s is not None


def test_api_key_is_sent_when_configured(live_server):
    cfg, server = live_server(api_key="sekrit")
    without = rx.send_chat(server.url, server.spec.model, one_request(), blank_record())
    assert without.status == 401
    with_key = rx.send_chat(server.url, server.spec.model, one_request(), blank_record(), api_key="sekrit")
    assert with_key.ok


def test_a_burst_returns_every_request(live_server):
    cfg, server = live_server()
    plan = rx.plan_workload(cfg, 6, "test")

    def make(r):
        return rx.RequestRecord("t", "A", "b", 0, r.burst, r.index, 0.0)

    records = rx.run_burst(server, plan.burst(0), make, cfg)
    assert [r.index for r in records] == list(range(6)) and all(r.ok for r in records)
    assert all(r.prompt_tokens and r.completion_tokens for r in records)


def test_requests_to_the_servers_never_go_through_a_proxy_from_the_shell(live_server, monkeypatch):
    cfg, server = live_server()
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get(server.url + "/health", timeout=2)  # what a plain client would do: the dead proxy
    assert rx.health_ok(server)
    assert rx.send_chat(server.url, server.spec.model, one_request(), blank_record()).ok
    plan = rx.plan_workload(cfg, 2, "test")
    records = rx.run_burst(
        server, plan.burst(0), lambda r: rx.RequestRecord("t", "A", "b", 0, 0, r.index, 0.0), cfg
    )
    assert all(r.ok for r in records)
