"""What the harness's own client adds: send delay and TTFT against a server that does no work.

    python3 benchmarks/client_bench.py
    python3 benchmarks/client_bench.py --rates 50,200,500 --duration-s 10 --streams 256 --output-tokens 64

Starts a zero-work streaming server in a subprocess of its own (this file run with --serve: one thread
and one selector speaking just enough HTTP/1.1 and OpenAI chat-completions SSE for the harness's client;
it answers each request as soon as it is read, in one write: --output-tokens content chunks, one HTTP
chunk each, then a finish_reason, the usage and `data: [DONE]`, built once per length, no sleeps;
lighter than tests/fakes/fake_vllm_server.py, which keeps fake GPU memory and a thread per connection).
Then drives it with run_experiments.run_burst, as the harness does:

- open loop: the harness's open_loop_plan (Poisson arrivals planned ahead, fixed seed), one window of
  --duration-s seconds per rate of --rates, each window one run_burst;
- closed loop: the harness's plan_workload, --closed-bursts bursts of --streams requests sent at once.

Prints one Markdown table, a row per load: requests, the rate they actually went out at (open loop),
failures, send delay (actual send - planned arrival, open loop) p50/p99/max, client-added TTFT p50/p99,
the server's own TTFT p99 and the most requests in flight at once (beside the client's thread cap,
rx.burst_threads). Client-added TTFT = the TTFT the client recorded minus the server's own time to first
token (the request's arrival, stamped by the kernel, to its answer written, so that the server's queue
is the server's; per request, keyed by the first word of the prompt); open loop, the client times TTFT
from the planned arrival, so it includes the send delay, and the next column leaves that out. Progress
goes to stderr, the table to stdout.
"""

import argparse
import dataclasses
import http.client
import json
import os
import platform
import re
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402

MODEL = "zero-work"
SETTLE_S = 1.0  # idle between loads: the previous one's sockets close, the server's queue empties


# %% The zero-work server (runs in its own process: `client_bench.py --serve`)
def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(event: dict) -> bytes:
    return http_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")


def choice_event(delta: dict, reason=None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"id": "chatcmpl-0", "object": "chat.completion.chunk", "model": MODEL, "choices": [choice]}


TOKEN_CHUNK = sse(choice_event({"content": " tok"}))
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def stream_tail(prompt_tokens: int, tokens: int) -> bytes:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": prompt_tokens + tokens,
    }
    last = {**choice_event({}, "length"), "usage": None}
    return (
        sse(last) + sse({**choice_event({}), "choices": [], "usage": usage}) + http_chunk(b"data: [DONE]\n\n")
    )


class ZeroWork:
    """The server: one thread, one selector over every connection. Each request is answered as soon as
    it is read, in one write of an answer built once per length, so that its own work per request is a
    few microseconds. Its time to first token runs from the request's arrival, stamped by the kernel,
    so it includes the time a request waited for this one thread: that queue is the server's, not the
    client's. `stamps` holds it per request, fetched (and cleared) by GET /stamps."""

    def __init__(self):
        self.stamps: dict[str, float] = {}
        self.answers: dict[tuple[int, int], bytes] = {}  # (tokens, prompt words) -> the streamed answer
        self.pending: dict[socket.socket, bytes] = {}
        self.selector = selectors.DefaultSelector()

    def serve(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.selector.register(listener, selectors.EVENT_READ)
        print(listener.getsockname()[1], flush=True)
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is listener:
                    self.accept(listener)
                else:
                    self.read(key.fileobj)

    def accept(self, listener: socket.socket) -> None:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, rx.SO_TIMESTAMPNS, 1)
        self.pending[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ)

    def read(self, sock: socket.socket) -> None:
        try:
            data, ancillary, _, _ = sock.recvmsg(1 << 16, rx.STAMP_BYTES)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(sock)
            del self.pending[sock]
            sock.close()
            return
        arrived = rx.arrival_time(ancillary, 0.0)
        self.pending[sock] += data
        while (end := self.pending[sock].find(b"\r\n\r\n")) >= 0:
            head = self.pending[sock][:end].decode("latin-1")
            length = int(re.search(r"(?im)^content-length: *(\d+)", head)[1]) if "ength:" in head else 0
            if len(self.pending[sock]) < end + 4 + length:
                return
            body = self.pending[sock][end + 4 : end + 4 + length]
            self.pending[sock] = self.pending[sock][end + 4 + length :]
            path = head.split(" ", 2)[1]
            sock.sendall(self.reply(body, arrived) if path == "/v1/chat/completions" else self.plain(path))

    def reply(self, body: bytes, arrived: float) -> bytes:
        """Every chunk of one streamed answer, to go in one write."""
        request = json.loads(body)
        prompt = request["messages"][0]["content"]
        tokens, words = int(request.get("max_tokens") or 16), len(prompt.split())
        answer = self.answers.get((tokens, words))
        if answer is None:
            answer = STREAM_HEAD + TOKEN_CHUNK * tokens + stream_tail(words, tokens) + b"0\r\n\r\n"
            self.answers[tokens, words] = answer
        self.stamps[prompt.split(" ", 1)[0]] = time.perf_counter() - arrived
        return answer

    def plain(self, path: str) -> bytes:
        data = b"{}"
        if path == "/stamps":
            data, self.stamps = json.dumps(self.stamps).encode(), {}
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(data),
            data,
        )


def exit_with_parent() -> None:
    """The benchmark holds our stdin: at its end-of-file (it ended, however) this process ends too."""
    sys.stdin.read()
    os._exit(0)


# %% The benchmark side
class ServerProcess:
    """The zero-work server in a subprocess, stopped on leaving the block (Ctrl-C included)."""

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop it
        )
        try:
            self.port = int(self.proc.stdout.readline())
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def stamps(self) -> dict:
        """The server's time to first token of each request since the last call, by request key."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/stamps")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


def bench_config(args: argparse.Namespace) -> rx.Config:
    return rx.Config(
        arrivals="poisson",
        rates=args.rates,
        duration_s=args.duration_s,
        max_tokens=args.output_tokens,
        prompt_tokens=0,  # the seed prompts: short, and the server reads only the first word
        ignore_eos=True,  # the client checks that every answer has all its tokens
        request_timeout_s=args.request_timeout_s,
        seed=args.seed,
    )


def key(request: rx.PlannedRequest) -> str:
    return f"{request.burst}.{request.index}"


def tagged(requests_: list[rx.PlannedRequest]) -> list[rx.PlannedRequest]:
    """The requests with their key as the prompt's first word, for the server's stamps."""
    return [dataclasses.replace(r, prompt=f"{key(r)} {r.prompt}") for r in requests_]


@dataclasses.dataclass
class Load:
    label: str
    records: list
    server_ttft: dict  # request key -> the server's own time to first token (s)
    threads: int  # the client's threads (and sockets) for it: rx.burst_threads


def run_load(label: str, server: ServerProcess, requests_: list, cfg: rx.Config) -> Load:
    """One run_burst of the harness, with a record per request as run_step makes them."""
    spec = types.SimpleNamespace(model=MODEL, name="A", label="A")
    target = types.SimpleNamespace(url=server.url, spec=spec, exit_code=server.proc.poll)
    requests_ = tagged(requests_)

    def make(r: rx.PlannedRequest) -> rx.RequestRecord:
        return rx.RequestRecord("client_bench", "A", label, 0, r.burst, r.index, 0.0)

    records = rx.run_burst(target, requests_, make, cfg, progress_every_s=3600.0)
    stamps = server.stamps()
    time.sleep(SETTLE_S)
    return Load(label, records, stamps, rx.burst_threads(requests_))


def most_in_flight(records: list) -> int:
    """The most requests between their (actual) send and their end at any one time."""
    edges = []
    for r in records:
        start = r.t_send + (r.send_delay_s or 0.0)
        edges += [(start, 1), (r.t_send + (r.e2e_s or 0.0), -1)]
    most = now = 0
    for _, step in sorted(edges):
        now += step
        most = max(most, now)
    return most


def send_rate(records: list) -> str:
    """Open loop: requests actually sent per second, first send to last."""
    sent = sorted(r.t_send + r.send_delay_s for r in records if r.send_delay_s is not None)
    return rx.fmt((len(sent) - 1) / (sent[-1] - sent[0]), 0) if len(sent) > 1 and sent[-1] > sent[0] else "—"


def ms(values: list, qs: list) -> str:
    return " / ".join(rx.fmt(None if v is None else v * 1000, 1) for v in rx.percentiles(values, qs))


def table_row(load: Load) -> list:
    records = load.records
    ok = [r for r in records if r.ok and key(r) in load.server_ttft]
    added = [r.ttft_s - load.server_ttft[key(r)] for r in ok]
    after_send = [a - (r.send_delay_s or 0.0) for a, r in zip(added, ok)]
    delays = [r.send_delay_s for r in records if r.send_delay_s is not None]
    return [
        load.label,
        len(records),
        send_rate(records),
        len(records) - sum(r.ok for r in records),
        ms(delays, [50, 99, 100]) if delays else "—",
        ms(added, [50, 99]),
        ms(after_send, [50, 99]) if delays else "(same)",
        ms(list(load.server_ttft.values()), [99]),
        f"{most_in_flight(records)} ({load.threads} threads)",
    ]


HEADINGS = (
    "load",
    "requests",
    "sent (req/s)",
    "failed",
    "send delay p50 / p99 / max (ms)",
    "client-added TTFT p50 / p99 (ms)",
    "of it after sending p50 / p99 (ms)",
    "server TTFT p99 (ms)",
    "max in flight",
)
COLUMNS = [(heading, lambda *cells, i=i: cells[i]) for i, heading in enumerate(HEADINGS)]


def report(loads: list, args: argparse.Namespace, argv: list, wall_s: float) -> list:
    command = shlex.join(["python3", "benchmarks/client_bench.py", *argv])
    load_avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}, load average {load_avg} at the end"
    )
    return [
        f"Machine: {machine}; command: `{command}`",
        "",
        *rx.md_table(COLUMNS, [table_row(load) for load in loads]),
        "",
        f"{args.output_tokens} tokens per answer from a zero-work server (its own TTFT: request arrived -> "
        "first chunk written). Client-added TTFT = the client's TTFT minus the server's, per request; "
        "open loop, the client times TTFT from the planned arrival, so it includes the send delay, and "
        "'after sending' leaves that out. Max in flight: requests between their actual send and their end "
        f"at once (the client's threads cap it). {wall_s:.0f} s in all.",
    ]


def run_all(args: argparse.Namespace) -> list:
    cfg = bench_config(args)
    rates = rx.parse_rates(cfg) if args.rates else []
    open_plan = rx.open_loop_plan(cfg, "client_bench") if rates else None
    closed = rx.plan_workload(cfg, args.streams, "client_bench", bursts=args.closed_bursts, prompt_tokens=0)
    warm = rx.plan_workload(cfg, 16, "warm-up", bursts=1, prompt_tokens=0)
    loads = []
    with ServerProcess() as server:
        run_load("warm-up", server, warm.burst(0), cfg)
        for window, rate in enumerate(rates):
            say(f"open loop at {rate:g} req/s for {args.duration_s:g} s ...")
            loads.append(run_load(f"open loop {rate:g} req/s", server, open_plan.burst(window), cfg))
        closed_runs = []
        for b in range(args.closed_bursts if args.streams else 0):
            say(f"closed loop: {args.streams} streams at once, burst {b + 1} of {args.closed_bursts} ...")
            closed_runs.append(run_load("closed", server, closed.burst(b), cfg))
    if closed_runs:
        loads.append(merged(closed_runs, f"closed loop {args.streams} streams x {args.closed_bursts}"))
    return loads


def merged(runs: list, label: str) -> Load:
    """Bursts of the same size as one load (their request keys differ by burst)."""
    stamps = {k: v for run in runs for k, v in run.server_ttft.items()}
    return Load(label, [r for run in runs for r in run.records], stamps, runs[0].threads)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", default="50,200,500", help="open-loop requests per second, one window each"
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds of arrivals per rate")
    parser.add_argument(
        "--streams", type=int, default=256, help="closed loop: requests sent at once (0: none)"
    )
    parser.add_argument("--closed-bursts", type=int, default=3, help="closed loop: how many such bursts")
    parser.add_argument("--output-tokens", type=int, default=64, help="content chunks per answer")
    parser.add_argument(
        "--request-timeout-s", type=float, default=60.0, help="the client's per-request limit"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the planned arrivals")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server's own process
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.serve:
        threading.Thread(target=exit_with_parent, daemon=True).start()
        ZeroWork().serve()
        return 0
    started = time.perf_counter()
    try:
        loads = run_all(args)
    except KeyboardInterrupt:  # the server is stopped by then
        say("interrupted")
        return 130
    print("\n".join(report(loads, args, argv, time.perf_counter() - started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
