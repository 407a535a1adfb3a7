"""The load generator: TTFT taken on arrival of the first token, failures as rows, auth."""

import contextlib
import dataclasses
import json
import random
import re
import socket
import struct
import threading
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


def scripted_chat(connections, tokens, **options):
    """One streamed request of `tokens` tokens (ignore_eos) through scripted connections."""
    return rx.send_chat(
        "http://f",
        "m",
        one_request(tokens),
        blank_record(),
        ignore_eos=True,
        connections=connections,
        **options,
    )


class ScriptedClock:
    """time.perf_counter for the harness: the scripted response moves it to each chunk's arrival."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedTime:
    """The harness's `time` module with a scripted perf_counter, and a wall clock `wall_offset` ahead of
    it (this process's own clock untouched)."""

    def __init__(self, clock, wall_offset=None):
        self.perf_counter = clock
        if wall_offset is not None:
            self.time = lambda: wall_offset + clock.now

    def __getattr__(self, name):
        return getattr(time, name)


class UnstampedReads:
    """A fake socket's reads as recvmsg gives them, with no arrival stamp from the kernel."""

    def recvmsg(self, size, ancillary_size):
        return self.recv(size), [], 0, None


class ScriptedSocket(UnstampedReads):
    """A socket whose reads arrive at scripted perf_counter times: a streamed HTTP 200, one HTTP chunk
    per read, then the terminating chunk."""

    def __init__(self, clock, chunks):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        framed = [(t, b"%x\r\n%s\r\n" % (len(data), data)) for t, data in chunks]
        self.clock, self.reads = (
            clock,
            [(0.0, head), *framed[:-1], (framed[-1][0], framed[-1][1] + b"0\r\n\r\n")],
        )
        self.sent, self.closed = b"", False

    def settimeout(self, seconds):
        pass

    def sendall(self, data):
        self.sent += data

    def recv(self, size, flags=0):
        t, data = self.reads.pop(0)
        self.clock.now = t
        return data

    def close(self):
        self.closed = True


class LateReader(ScriptedSocket):
    """Each read taken `late` seconds after its arrival, which the kernel stamped on the wall clock."""

    def __init__(self, clock, chunks, late, wall_offset):
        super().__init__(clock, chunks)
        self.late, self.wall_offset = late, wall_offset

    def recvmsg(self, size, ancillary_size):
        t, data = self.reads.pop(0)
        self.clock.now = t + self.late
        nanoseconds = round((self.wall_offset + t) * 1e9)
        stamp = struct.pack("qq", nanoseconds // 10**9, nanoseconds % 10**9)
        return data, [(socket.SOL_SOCKET, rx.SO_TIMESTAMPNS, stamp)], 0, None


class ScriptedConnections:
    def __init__(self, sock):
        self.sock, self.returned = sock, []

    def get(self, address, timeout_s):
        return self.sock, False

    def done(self, address, sock, keep):
        if keep:
            self.returned.append(sock)
        else:
            sock.close()


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


def scripted_stream(tokens, first, gap):
    """A stream's reads as (arrival, bytes): the role chunk (no content) at 1/16 s, the first token at
    `first`, the others `gap` apart, usage with the last one, [DONE] 1/64 s later."""
    last = first + (tokens - 1) * gap
    chunks = [(1 / 16, token_event({"role": "assistant", "content": ""}))]
    chunks += [
        (first + i * gap, token_event({"content": "tok "}, "length" if i == tokens - 1 else None))
        for i in range(tokens)
    ]
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    return [
        *chunks,
        (last, sse({"id": "c", "choices": [], "usage": usage})),
        (last + 1 / 64, b"data: [DONE]\n\n"),
    ]


def test_a_read_the_client_takes_late_is_timed_at_its_arrival(monkeypatch):
    # Every read is taken 0.125 s after the kernel stamped its arrival: the latencies are the arrivals'
    clock, wall_offset = ScriptedClock(), 1_000_000.0
    monkeypatch.setattr(rx, "time", ScriptedTime(clock, wall_offset))
    first, gap, tokens = 0.25, 1 / 32, 8
    sock = LateReader(clock, scripted_stream(tokens, first, gap), 0.125, wall_offset)
    record = scripted_chat(ScriptedConnections(sock), tokens)
    assert record.ok, record.error
    assert record.ttft_s == pytest.approx(first, abs=1e-6)
    assert record.itl_s == pytest.approx([gap] * (tokens - 1), abs=1e-6)
    assert record.e2e_s == pytest.approx(first + (tokens - 1) * gap + 1 / 64, abs=1e-6)
    assert not sock.reads


def test_an_arrival_stamp_counts_only_between_the_send_and_the_read(monkeypatch):
    clock = ScriptedClock()
    clock.now = 10.0
    monkeypatch.setattr(rx, "time", ScriptedTime(clock, wall_offset=1000.0))

    def stamped(wall):
        nanoseconds = round(wall * 1e9)
        return [(socket.SOL_SOCKET, rx.SO_TIMESTAMPNS, struct.pack("qq", *divmod(nanoseconds, 10**9)))]

    assert rx.arrival_time(stamped(1009.5), sent=9.0) == pytest.approx(9.5)
    assert rx.arrival_time(stamped(1008.0), sent=9.0) == 9.0, "not before the request was sent"
    assert rx.arrival_time(stamped(1011.0), sent=9.0) == 10.0, "a clock step: the read's own time"
    assert rx.arrival_time([], sent=9.0) == 10.0, "no stamp: the read's own time"


def test_a_closed_burst_request_is_timed_from_its_send_with_the_wake_up_counted(monkeypatch):
    # The client takes 0.5 s to get its socket (its own work: not counted); the gate waits 1 s for a
    # wake-up (the request's latency: counted); then the first token comes 0.25 s after the send
    clock = ScriptedClock()
    monkeypatch.setattr(rx, "time", ScriptedTime(clock))
    first, gap, tokens = 0.25, 1 / 32, 4

    class SlowConnections(ScriptedConnections):
        def get(self, address, timeout_s):
            clock.now += 0.5
            return self.sock, False

    class WakeUp:
        def __call__(self):
            clock.now += 1.0

        def release(self):
            pass

    chunks = [(1.5 + t, data) for t, data in scripted_stream(tokens, first, gap)]
    sock = ScriptedSocket(clock, chunks)
    sock.reads[0] = (1.5, sock.reads[0][1])  # the head comes at the send
    record = scripted_chat(SlowConnections(sock), tokens, gate=WakeUp())
    assert record.ok, record.error
    assert record.ttft_s == 1.0 + first
    assert record.e2e_s == 1.0 + first + (tokens - 1) * gap + 1 / 64


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
    sock = ScriptedSocket(clock, chunks)
    connections = ScriptedConnections(sock)
    record = scripted_chat(connections, tokens)
    assert record.ok, record.error
    assert record.ttft_s == first, "the first content chunk, not the role chunk nor the end of the stream"
    assert record.itl_s == [gap] * (tokens - 1)
    assert record.e2e_s == last + 1 / 64
    assert (
        record.completion_tokens == tokens and record.prompt_tokens == 12 and record.finish_reason == "length"
    )
    assert record.content_reads == tokens
    # one streamed POST, every read taken as it came, and the socket kept for the next request
    head, body = sock.sent.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert json.loads(body)["stream"] is True and json.loads(body)["max_tokens"] == tokens
    assert not sock.reads and connections.returned == [sock] and not sock.closed


class PiecesSocket(UnstampedReads):
    """A socket that hands out a response's bytes in the pieces given, then end-of-file."""

    def __init__(self, pieces):
        self.pieces, self.sent, self.closed = list(pieces), b"", False

    def settimeout(self, seconds):
        pass

    def sendall(self, data):
        self.sent += data

    def recv(self, size, flags=0):
        return self.pieces.pop(0) if self.pieces else b""

    def close(self):
        self.closed = True


def streamed_answer(tokens, close=False):
    """vLLM's answer as bytes on the wire: head, one HTTP chunk per event, the terminating chunk."""
    events = [token_event({"content": "tok "}, "length" if i == tokens - 1 else None) for i in range(tokens)]
    usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
    events += [sse({"id": "c", "choices": [], "usage": usage}), b"data: [DONE]\n\n"]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + (b"Connection: close\r\n" if close else b"")
    return head + b"\r\n" + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def test_a_stream_cut_into_any_pieces_reads_the_same(monkeypatch):
    # The same answer split at random byte positions (chunk sizes, CRLFs and JSON cut anywhere, single
    # bytes included): every token counted, the usage read, [DONE] found, and the body read to its end
    # (the terminating chunk too, split or not), so the socket is kept for the next request
    tokens, wire = 12, streamed_answer(12)
    rng = random.Random(7)
    for trial in range(60):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 40 if trial else len(wire) - 1)))
        pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
        sock = PiecesSocket(pieces)
        connections = ScriptedConnections(sock)
        record = scripted_chat(connections, tokens, timeout_s=30)
        assert record.ok, (trial, record.error)
        assert (
            record.completion_tokens == tokens
            and record.prompt_tokens == 5
            and len(record.itl_s) == tokens - 1
        )
        assert connections.returned == [sock] and not sock.closed and not sock.pieces, trial


def test_bodies_framed_by_length_or_by_the_close_are_read_too():
    events = streamed_answer(4).split(b"\r\n\r\n", 1)[1]
    sse_bytes = b"".join(re.findall(rb"(data: .*?\n\n)", events))
    for head in (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(sse_bytes),
        b"HTTP/1.0 200 OK\r\n\r\n",
    ):
        sock = PiecesSocket([head + sse_bytes[:50], sse_bytes[50:]])
        record = scripted_chat(ScriptedConnections(sock), 4)
        assert record.ok and record.completion_tokens == 4, (head, record.error)
    error = b'{"error": "model not found"}'
    sock = PiecesSocket([b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error)])
    record = rx.send_chat(
        "http://f", "m", one_request(4), blank_record(), connections=ScriptedConnections(sock)
    )
    assert record.status == 404 and record.error == f"HTTP 404: {error.decode()}"


def test_the_end_of_a_chunked_body_is_found_split_or_with_trailers():
    assert rx.dechunk(b"3\r\nabc\r\n0\r\n") == (b"abc", b"0\r\n", False), "the empty line still to come"
    assert rx.dechunk(b"0\r\n\r\n") == (b"", b"", True)
    assert rx.dechunk(b"0\r\nX-Trailer: 1\r\n") == (b"", b"0\r\nX-Trailer: 1\r\n", False)
    assert rx.dechunk(b"0\r\nX-Trailer: 1\r\n\r\n") == (b"", b"", True)
    assert rx.dechunk(b"5;ext=1\r\nhel") == (b"", b"5;ext=1\r\nhel", False), "half a chunk waits"


def test_a_kept_socket_the_server_closed_meanwhile_costs_a_retry_not_a_failure():
    stale, fresh = PiecesSocket([]), PiecesSocket([streamed_answer(3)])  # the stale one reads end-of-file

    class TwoSockets(ScriptedConnections):
        def get(self, address, timeout_s):
            return (stale, True) if not stale.closed else (fresh, False)

    connections = TwoSockets(None)
    record = scripted_chat(connections, 3)
    assert record.ok and stale.closed and connections.returned == [fresh]
    assert fresh.sent.startswith(b"POST /v1/chat/completions ") and fresh.sent == stale.sent


def test_a_socket_is_kept_only_when_the_server_keeps_it():
    wire = streamed_answer(3, close=True)
    sock = PiecesSocket([wire])
    connections = ScriptedConnections(sock)
    assert scripted_chat(connections, 3, timeout_s=30).ok
    assert connections.returned == [] and sock.closed, "Connection: close"
    ours, theirs = socket.socketpair()
    assert rx.still_connected(ours), "open, nothing unread"
    theirs.sendall(b"x")
    assert not rx.still_connected(ours), "bytes nobody asked for"
    ours.recv(1)
    theirs.close()
    assert not rx.still_connected(ours), "closed by the server"
    ours.close()


def median_ttft(server, tokens, runs=3):
    connections = rx.Connections()
    rx.send_chat(server.url, server.spec.model, one_request(2), blank_record(), connections=connections)
    records = [
        rx.send_chat(
            server.url,
            server.spec.model,
            one_request(tokens),
            blank_record(),
            ignore_eos=True,
            connections=connections,
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
    assert not refused.ok and refused.status is None and "ConnectionRefusedError" in refused.error
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


def test_a_halt_sends_no_more_of_an_open_loop_window(live_server):
    cfg, server = live_server()
    spread = [dataclasses.replace(r, offset_s=0.5 * r.index) for r in rx.plan_workload(cfg, 20, "t").burst(0)]
    stop = threading.Event()
    halt = threading.Timer(0.7, stop.set)  # a model beside it fails 0.7 s in
    halt.start()
    began = time.time()
    records = rx.run_burst(
        server, spread, lambda r: rx.RequestRecord("t", "A", "b", 0, 0, r.index, 0.0), cfg, halt=stop
    )
    assert [r.index for r in records] == [0, 1] and all(r.ok for r in records), "sent before it: recorded"
    assert time.time() - began < 3, "not the window's 9.5 s"


def test_a_window_where_one_model_fails_ends_once_the_others_stopped_sending(monkeypatch):
    trial = types.SimpleNamespace(router=None, halt=threading.Event())
    stopped = []

    def run_step(trial, step, repeat, sink, gate):
        if step.server == "A":
            time.sleep(0.1)
            raise rx.ServerError("A died")
        stopped.append(trial.halt.wait(10))  # B sends until told to stop

    monkeypatch.setattr(rx, "run_step", run_step)
    burst = rx.BurstMark("trace 1", "*", 0, time.time())
    steps = [rx.Step("trace 1", slot, "trace", 0) for slot in "AB"]
    with pytest.raises(rx.ServerError, match="A died"):
        rx.run_concurrent_window(trial, steps, burst, sink=None)
    assert stopped == [True], "B was halted, and had stopped before the window ended"


def test_a_closed_burst_connects_every_socket_before_its_clock_starts(live_server, monkeypatch):
    cfg, server = live_server()
    connects, real_connect = [], rx.connect

    def counted(address, timeout_s):
        connects.append(time.time())
        return real_connect(address, timeout_s)

    monkeypatch.setattr(rx, "connect", counted)
    plan = rx.plan_workload(cfg, 8, "test")
    records = rx.run_burst(
        server, plan.burst(0), lambda r: rx.RequestRecord("t", "A", "b", 0, 0, r.index, 0.0), cfg
    )
    assert all(r.ok for r in records)
    assert len(connects) == 8, "one socket per request, none opened inside the measured time"
    assert max(connects) <= min(r.t_send for r in records)


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


def test_closing_the_connections_ends_a_request_a_silent_server_never_answers():
    # a server stopping gracefully with its engine gone waits for its open requests and answers none:
    # closing a burst's connections must end the threads reading them, or the harness cannot exit
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        connections, done = rx.Connections(), []

        def request():
            done.append(
                rx.send_chat(url, "m", one_request(), blank_record(), timeout_s=60, connections=connections)
            )

        thread = threading.Thread(target=request)
        thread.start()
        accepted, _ = listener.accept()  # the request is in; no answer ever comes
        with accepted:
            accepted.recv(65536)
            connections.close()
            thread.join(timeout=10)
    assert not thread.is_alive(), "still blocked on the silent server"
    assert done and not done[0].ok


def record(**fields) -> "rx.RequestRecord":
    """A request's row of experiment x, server A; sent at 0.0 unless given."""
    return rx.RequestRecord(
        **dict(experiment="x", server="A", phase="p", repeat=0, burst=0, index=0, t_send=0.0) | fields
    )


def test_a_last_sse_line_without_its_newline_still_ends_the_stream():
    event = json.dumps({"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}).encode()
    reads = iter([(1.0, b"data: " + event + b"\n\ndata: [DONE]")])
    row = record()
    assert rx.read_sse(reads, row, start=0.5) and row.e2e_s == 0.5 and row.ttft_s == 0.5


def test_an_open_loop_request_at_offset_zero_keeps_its_planned_arrival():
    first = rx.PlannedRequest(0, 0, "p", 4, 0.0, offset_s=0.0)
    started = (time.perf_counter() - 0.5, time.time() - 0.5)
    halt = threading.Event()
    assert rx.await_arrival(first, started, True, halt) == started, "its lateness counts from there"
    assert rx.await_arrival(first, started, False, halt) is None
    assert rx.is_open_loop([first, rx.PlannedRequest(0, 1, "p", 4, 0.0, offset_s=0.2)])


def test_a_request_still_open_at_the_end_of_its_burst_is_timed_from_its_own_send():
    never_sent = rx.still_open(record(), planned_send=time.time() - 2.0, error="still open")
    assert never_sent.t_send > 0 and 1.9 < never_sent.e2e_s < 3.0
    sent = rx.still_open(record(t_send=time.time() - 1.0), planned_send=time.time() - 5.0, error="still open")
    assert 0.9 < sent.e2e_s < 2.0 and not sent.ok


def test_an_empty_data_line_is_skipped_and_an_aborted_stream_is_a_failure():
    def event(content, finish=None):
        return json.dumps({"choices": [{"delta": {"content": content}, "finish_reason": finish}]}).encode()

    reads = [(1.0, b"data:\n\ndata: " + event("hi") + b"\n\n"), (1.5, b"data: " + event("", "abort"))]
    row = record()
    done = rx.read_sse(iter([*reads, (2.0, b"\n\ndata: [DONE]\n\n")]), row, start=0.5)
    assert done and row.ttft_s == 0.5 and row.finish_reason == "abort"
    assert rx.completion_problem(row, done, max_tokens=1, ignore_eos=False) == "finish_reason abort"


def test_a_failed_closed_burst_request_is_timed_from_its_own_send(monkeypatch):
    def cut_body(headers):
        time.sleep(0.1)
        raise ConnectionError("cut")
        yield

    @contextlib.contextmanager
    def slow_exchange(connections, url, request, deadline):
        time.sleep(1.0)  # the client's own work before the send: not the server's time
        yield types.SimpleNamespace(sent=time.perf_counter(), complete=False, body=cut_body), 200, {}

    monkeypatch.setattr(rx, "exchange", slow_exchange)
    planned = rx.PlannedRequest(0, 0, "p", 4, 0.0)
    row = rx.send_chat("http://127.0.0.1:9", "m", planned, record(), timeout_s=30)
    assert not row.ok and "cut" in row.error
    assert row.e2e_s < 0.9, "timed from its send, after the client's own second"
    assert abs(row.t_send + row.e2e_s - time.time()) < 0.5


def test_a_reasoning_models_thinking_counts_as_its_first_tokens():
    def event(delta):
        return (
            b"data: " + json.dumps({"choices": [{"delta": delta, "finish_reason": None}]}).encode() + b"\n\n"
        )

    reads = [(1.0, event({"role": "assistant"})), (1.2, event({"reasoning": "hm"}))]
    reads += [
        (1.3, event({"reasoning_content": "so"})),
        (1.5, event({"content": "A"})),
        (1.6, b"data: [DONE]\n\n"),
    ]
    row = record()
    assert rx.read_sse(iter(reads), row, start=1.0)
    assert row.ttft_s == pytest.approx(0.2) and row.itl_s == pytest.approx([0.1, 0.2])
