"""Stand-in for `python -m vllm.entrypoints.openai.api_server` on machines without a GPU.

It speaks the parts of vLLM's OpenAI-compatible HTTP API that the benchmark harness
uses and reports "GPU memory" through state files read by the fake pynvml module
(tests/fakes/pynvml.py). See tests/fakes/README.md for the environment variables.

As in real vLLM, all GPU memory belongs to an engine child process ("EngineCore"),
not to the API server process, and memory only moves with load when kvcached is on.
The memory counts on the card that CUDA_VISIBLE_DEVICES names by UUID (card 0 otherwise).
/metrics also carries vLLM's request-latency histograms (TTFT, end-to-end, queue, prefill,
decode), timed after a FAKE_FRONTEND_S delay that stands for the HTTP/tokenizer front end.
"""

import argparse
import collections
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MIB = 1024 * 1024
PAGE = 2 * MIB  # kvcached maps KV memory in 2 MiB pages
OVERHEAD = 300 * MIB  # CUDA context, activations, ...
PREALLOC = 32 * MIB  # pages kvcached keeps mapped while idle
# Seen on an H200 with vLLM 0.24 + kvcached 0.1.6: after its first burst a kvcached server settles
# ~480 MiB above its just-loaded level (pages kept mapped for reuse), and a static server holds
# ~320 MiB more than --gpu-memory-utilization x total (the CUDA context is outside that budget).
RESERVE_AFTER_USE = 64 * MIB
# A sleep-mode server that has served holds memory outside vLLM's cumem pool (torch's caching allocator),
# freed at each sleep and regrown in each burst: 2-15 GiB on an H200, less here.
OUTSIDE_POOL = 256 * MIB
CONTEXT = 300 * MIB
DEFAULT_KV_PER_TOKEN = 12288

# vLLM 0.24 runs these on its Model Runner V2 unless VLLM_USE_V2_MODEL_RUNNER says otherwise
# (DEFAULT_V2_MODEL_RUNNER_ARCHITECTURES in vllm/config/vllm.py); 0.25-0.28 run every dense model on V2,
# 0.29 and 0.30 every model.
V2_DEFAULT_ARCHITECTURES = {
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Qwen2MoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "GraniteMoeForCausalLM",
}
V2_FOR_EVERY_MODEL_FROM = (0, 25)
KVCACHED_V2_FROM = (0, 28)  # kvcached 0.1.6 runs on Model Runner V2 from this vLLM on
KVCACHED_V1_UNTIL = (0, 28)  # ... and on V1 up to this one (it requires V2 from 0.29)
KVCACHED_LAST_VLLM = (0, 30)  # its engine-start patch has no runner adapter for newer vLLM

# The engine child: holds the memory (on paper) and dies with its parent, like EngineCore.
CHILD_CODE = r"""
import os, signal, subprocess, sys, time
parent, grandchild, gpu_dir = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # die quietly, no KeyboardInterrupt trace
if grandchild:  # a process that outlives its parent: only killing the group removes it
    p = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                          "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
                          "while True: time.sleep(3600)"])
    if gpu_dir:  # whole or not at all: a test may read it the moment it appears
        path = os.path.join(gpu_dir, "grandchild.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(p.pid))
        os.replace(path + ".tmp", path)
# Like vLLM 0.24's EngineCore (vllm-project/vllm#55510), FAKE_ORPHAN_ENGINE=1 keeps it (and its
# "GPU memory") alive after its API server dies: only whoever started the server can stop it then.
orphan = os.environ.get("FAKE_ORPHAN_ENGINE") == "1"
while orphan or os.getppid() == parent:
    time.sleep(0.2)
"""

STREAM_FAULTS = ("error_event", "truncate", "no_finish_reason", "short", "keepalive", "trickle", "no_stream")

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_METRICS = (  # (name, help), in the order Latencies.observe takes them
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
)

# vLLM's API server module takes 15-20 s to import. FAKE_IMPORT_S stands for that: paid when this file
# is imported or run, but not again when a process that imported it runs it (runpy, as the harness's
# --preimport does).
if __name__ != "__main__" or "fake_vllm_server" not in sys.modules:
    time.sleep(float(os.environ.get("FAKE_IMPORT_S") or 0))

_log_lock = threading.Lock()
_fault_lock = threading.Lock()
_chat_requests = 0


def log(msg, err=False):
    stream = sys.stderr if err else sys.stdout
    with _log_lock:
        stream.write(msg + "\n")
        stream.flush()


def env_float(name, default):
    return float(os.environ.get(name, default))


NO_CHAT_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
    "template if the tokenizer does not define one."
)


def next_fault():
    """FAKE_STREAM_FAULT for the next chat request, "" if FAKE_FAULT_EVERY skips this one."""
    global _chat_requests
    with _fault_lock:
        _chat_requests += 1
        n = _chat_requests
    every = int(os.environ.get("FAKE_FAULT_EVERY") or 1)
    return os.environ.get("FAKE_STREAM_FAULT", "") if (n - 1) % every == 0 else ""


def visible_uuid():
    """The card the harness pinned this server to (CUDA_VISIBLE_DEVICES=GPU-...), else None."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return value if value.startswith("GPU-") else None


def card_memory():
    """(total, used) bytes of this server's card, as the fake pynvml sees it."""
    try:
        import pynvml as nvml  # the fake next to this file

        index = nvml.card_index(visible_uuid())
        return nvml.total_bytes(index), nvml.used_bytes(index)
    except (ImportError, AttributeError):
        return int(env_float("FAKE_GPU_TOTAL_MIB", 16384) * MIB), 0


class Latencies:
    """vLLM's per-request latency histograms, observed once per finished request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buckets = [[0] * len(LATENCY_BUCKETS) for _ in LATENCY_METRICS]  # not cumulative
        self.sums = [0.0] * len(LATENCY_METRICS)
        self.count = 0

    def observe(self, ttft, e2e, queue, prefill, decode):
        with self.lock:  # all five at once, so a scrape never sees half a request
            for i, value in enumerate((ttft, e2e, queue, prefill, decode)):
                self.sums[i] += value
                for j, bound in enumerate(LATENCY_BUCKETS):
                    if value <= bound:
                        self.buckets[i][j] += 1
                        break
            self.count += 1

    def rows(self, label):
        """Prometheus text lines; `label` is the rows' '{...}' label set."""
        with self.lock:
            buckets, sums, count = [list(b) for b in self.buckets], list(self.sums), self.count
        inner = label[:-1]  # a bucket row has the same labels plus le="<bound>"
        out = []
        for (name, help_text), counts, total in zip(LATENCY_METRICS, buckets, sums):
            out += ["# HELP %s %s" % (name, help_text), "# TYPE %s histogram" % name]
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, counts):
                cumulative += n
                out.append('%s_bucket%s,le="%r"} %s' % (name, inner, bound, float(cumulative)))
            out += [
                '%s_bucket%s,le="+Inf"} %s' % (name, inner, float(count)),
                "%s_sum%s %r" % (name, label, total),
                "%s_count%s %s" % (name, label, float(count)),
            ]
        return out


def make_parser():
    # Strict like vLLM: an unknown flag is "error: unrecognized arguments", exit 2.
    p = argparse.ArgumentParser(prog="api_server.py", allow_abbrev=False)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer")
    p.add_argument("--api-key")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-sleep-mode", action="store_true")
    return p


def non_default_args(parser, args):
    """What vLLM logs at start-up: parsed args that differ from their defaults (secrets too)."""
    return {k: v for k, v in vars(args).items() if v != parser.get_default(k)}


def installed(name, default):
    """A package's version as this Python sees it: tests put fake metadata (NAME-X.dist-info) on the path.
    Read from the first such folder on sys.path, as importlib.metadata would (without importing it: it
    is most of the fake's start-up)."""
    for folder in sys.path:
        if os.path.isdir(folder):
            for entry in sorted(os.listdir(folder)):
                if entry.startswith(name + "-") and entry.endswith(".dist-info"):
                    return entry[len(name) + 1 : -len(".dist-info")]
    return default


def release(version):
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def architecture(model):
    try:
        with open(os.path.join(model, "config.json")) as f:
            return (json.load(f).get("architectures") or [""])[0]
    except (OSError, ValueError, AttributeError):
        return ""


def model_runner(vllm_version, architecture_name):
    setting = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if setting is not None:
        return "V2" if setting.strip().lower() in ("1", "true") else "V1"
    if release(vllm_version) >= V2_FOR_EVERY_MODEL_FROM:
        return "V2"
    return "V2" if architecture_name in V2_DEFAULT_ARCHITECTURES else "V1"


def kvcached_refusal(vllm_version, runner):
    """Why kvcached 0.1.6 stops this engine at start, or None."""
    found = release(vllm_version)
    if found > KVCACHED_LAST_VLLM:
        return "RuntimeError: kvcached has no runner adapter for vLLM %s" % vllm_version
    if runner == "V2" and found < KVCACHED_V2_FROM:
        return (
            "kvcached.utils.KVCachedConfigError: kvcached does not support the vLLM %s Model Runner V2 "
            "yet; set VLLM_USE_V2_MODEL_RUNNER=0 to use the V1 model runner, or disable kvcached"
            % vllm_version
        )
    if runner == "V1" and found > KVCACHED_V1_UNTIL:
        return (
            "kvcached.utils.KVCachedConfigError: kvcached requires Model Runner V2 on vLLM %s" % vllm_version
        )
    return None


def model_sizes(model):
    """(weight bytes, KV bytes per token, max position) estimated from config.json."""
    cfg = {}
    try:
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        pass
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal configs nest the language model
    weights, kv_per_token = 1024 * MIB, DEFAULT_KV_PER_TOKEN
    try:
        layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        weights = 2 * (12 * layers * hidden * hidden + int(cfg["vocab_size"]) * hidden)
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        kv_per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, 2-byte dtype
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass  # keep what was worked out so far, defaults for the rest
    return weights, kv_per_token, int(cfg.get("max_position_embeddings") or 4096)


# --- kvcached shared-memory segment: three little-endian int64 (total, used, prealloc) ---


def segment_path():
    name = os.environ.get("KVCACHED_IPC_NAME", "kvcached_mem_info")
    return os.path.join(os.environ.get("FAKE_SHM_DIR") or "/dev/shm", name)


def segment_write(path, offset, values):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, struct.pack("<%dq" % len(values), *values), offset)
    finally:
        os.close(fd)  # closing drops the lock


def segment_read_total(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    return struct.unpack("<q", data)[0] if len(data) == 8 else None


class Engine:
    """Memory accounting and FCFS admission shared by all request threads."""

    def __init__(self, weights, kv_per_token, kvcached, pool, seg_total):
        self.base = weights + OVERHEAD
        self.kv = kv_per_token
        self.kvcached = kvcached
        self.pool = pool  # static arm: KV pool bytes
        self.seg_total = seg_total  # kvcached arm: last limit read from the segment
        self.seg_path = segment_path() if kvcached else None
        self.gpu_dir = os.environ.get("FAKE_GPU_DIR")
        self.uuid = visible_uuid()
        self.cond = threading.Condition()
        self.queue = collections.deque()  # request ids waiting for admission, oldest first
        self.running = 0
        self.reserved = 0  # bytes reserved by running requests
        self.kv_tokens = 0  # tokens whose KV is held right now
        self.preemptions = 0
        self.ready = False  # before: weights only; after: KV pool too
        self.reserve = 0  # kvcached pages kept mapped once the first request ran
        self.closed = False
        self.asleep = 0  # sleep level, 0 = awake
        self.sleep_mode = False  # --enable-sleep-mode
        self.outside = 0  # sleep mode: bytes held outside the pool since the last sleep
        self.child = None
        self.published = None

    # memory
    def kv_bytes(self):
        raw = self.kv_tokens * self.kv
        return -(-raw // PAGE) * PAGE if self.kvcached else raw

    def memory(self):
        if not self.ready:
            return self.base + CONTEXT
        if self.asleep:  # level 1 moves the weights to host memory and drops the KV pool; level 2 drops both
            return CONTEXT
        if self.kvcached:
            return self.base + CONTEXT + PREALLOC + self.reserve + self.kv_bytes()
        return self.base + CONTEXT + self.pool + self.outside

    def capacity(self):
        if not self.kvcached:
            return self.pool // self.kv * self.kv
        try:  # the harness may rewrite the limit at any time
            total = segment_read_total(self.seg_path)
            if total is not None:
                self.seg_total = total
        except OSError:
            pass
        return max(0, self.seg_total - PREALLOC)

    def publish(self, force=False):
        """Write memory to the state file and used bytes to the segment. Call with cond held."""
        mem = self.memory()
        if self.closed or (mem == self.published and not force):
            return
        self.published = mem
        if self.gpu_dir and self.child:
            path = os.path.join(self.gpu_dir, "%d.json" % self.child.pid)
            state = {"used_bytes": mem, "name": "EngineCore"}
            if self.uuid:
                state["uuid"] = self.uuid  # the fake pynvml counts it on that card only
            with open(path + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(path + ".tmp", path)  # readers never see half a file
        if self.kvcached and self.ready:
            try:
                segment_write(self.seg_path, 8, [self.kv_bytes()])
            except OSError:
                pass

    def start(self, grandchild):
        self.child = subprocess.Popen(
            [
                sys.executable,
                "-S",  # the engine stand-in needs only the standard library
                "-c",
                CHILD_CODE,
                str(os.getpid()),
                "1" if grandchild else "0",
                self.gpu_dir or "",
            ]
        )
        with self.cond:
            self.publish()

    def become_ready(self):
        with self.cond:
            if self.kvcached:
                segment_write(self.seg_path, 0, [self.seg_total, 0, PREALLOC])
            self.ready = True
            self.publish()

    # requests
    def admit(self, rid, need, prompt_tokens):
        """Block until this request's reservation fits (FCFS), then hold its prompt's KV."""
        with self.cond:
            self.queue.append(rid)
            waited = False
            while True:
                fits = self.reserved + need <= self.capacity()
                # A request too big to ever fit still runs alone, so nothing deadlocks.
                if self.queue[0] == rid and (fits or self.running == 0):
                    break
                if not waited:
                    waited = True
                    self.preemptions += 1
                self.cond.wait(0.05)  # wake up now and then: the limit may have grown
            self.queue.popleft()
            self.reserve = RESERVE_AFTER_USE
            self.outside = OUTSIDE_POOL if self.sleep_mode else 0
            self.running += 1
            self.reserved += need
            self.kv_tokens += prompt_tokens
            self.publish(force=True)
            self.cond.notify_all()  # the next in line may fit too

    def add_token(self):
        with self.cond:
            self.kv_tokens += 1
            self.publish()

    def finish(self, need, held):
        with self.cond:
            self.running -= 1
            self.reserved -= need
            self.publish(force=True)
            self.cond.notify_all()
        # KV pages are given back a moment after the request ends, as in kvcached.
        threading.Timer(0.05, self._free, (held,)).start()

    def _free(self, tokens):
        with self.cond:
            self.kv_tokens -= tokens
            self.publish()

    def usage(self):
        with self.cond:
            cap = self.capacity()
            return min(1.0, self.kv_tokens * self.kv / cap) if cap else 0.0

    def cleanup(self):
        """Remove the state file and segment, stop the engine child. Safe from a signal handler."""
        got = self.cond.acquire(timeout=0.2)
        try:
            if self.closed:
                return
            self.closed = True
            if self.gpu_dir and self.child:
                try:
                    os.unlink(os.path.join(self.gpu_dir, "%d.json" % self.child.pid))
                except OSError:
                    pass
            if self.kvcached:
                try:
                    os.unlink(self.seg_path)
                except OSError:
                    pass
            if self.child and self.child.poll() is None:
                self.child.terminate()
        finally:
            if got:
                self.cond.release()


def error_body(message, kind, code):
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    args = None  # set in main()
    api_key = None
    engine = None
    latencies = None
    names = None
    max_len = None

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        # Small SSE chunks must leave at once: the harness times token arrival.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        log("INFO:     %s - %s" % (self.address_string(), fmt % args))

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def authorized(self):
        key = self.api_key
        if key and self.headers.get("Authorization") != "Bearer " + key:
            self.send_json(401, {"error": "Unauthorized"})
            return False
        return True

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/metrics":
            body = self.metrics().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/is_sleeping" and self.sleep_endpoints():
            self.send_json(200, {"is_sleeping": bool(self.engine.asleep)})
        elif path == "/v1/models":
            if self.authorized():
                self.send_json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": n,
                                "object": "model",
                                "created": int(time.time()),
                                "owned_by": "vllm",
                                "root": self.args.model,
                                "max_model_len": self.max_len,
                            }
                            for n in self.names
                        ],
                    },
                )
        else:
            self.send_json(404, {"detail": "Not Found"})

    def sleep_endpoints(self):
        """vLLM's sleep mode: only with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1, as in vLLM 0.24."""
        return self.args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        if path in ("/sleep", "/wake_up") and self.sleep_endpoints() and self.authorized():
            level = int(dict(q.split("=", 1) for q in query.split("&") if "=" in q).get("level", "1"))
            time.sleep(env_float("FAKE_SLEEP_S" if path == "/sleep" else "FAKE_WAKE_S", 0.05))
            with self.engine.cond:
                awake = self.engine.memory()
                self.engine.asleep = level if path == "/sleep" else 0
                if path == "/sleep":
                    self.engine.outside = 0
                    log_sleep(self.engine, level, awake - self.engine.memory())
                self.engine.publish(force=True)
            log("INFO %s (level %d)" % ("sleeping" if path == "/sleep" else "woken up", level))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif (
            path == "/reset_prefix_cache"
            and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
            and self.authorized()
        ):
            log("INFO Resetting prefix cache...")  # as vLLM's development mode serves it
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path != "/v1/chat/completions":
            self.send_json(404, {"detail": "Not Found"})
        elif self.engine.asleep and self.authorized():  # nothing on the card to compute with
            self.send_json(500, error_body("The engine is sleeping", "InternalServerError", 500))
        elif self.authorized():
            try:
                self.chat(raw)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                log("INFO Aborted request: client disconnected")

    def metrics(self):
        e = self.engine
        label = '{engine="0",model_name="%s"}' % (
            self.names[0].replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        )
        usage = e.usage()
        with e.cond:
            rows = [
                (
                    "vllm:num_requests_running",
                    "gauge",
                    "Number of requests in model execution batches.",
                    e.running,
                ),
                (
                    "vllm:num_requests_waiting",
                    "gauge",
                    "Number of requests waiting to be processed.",
                    len(e.queue),
                ),
                ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage),
                (
                    "vllm:num_preemptions_total",
                    "counter",
                    "Cumulative number of preemption from the engine.",
                    e.preemptions,
                ),
            ]
        out = []
        for name, kind, help_text, value in rows:
            out += [
                "# HELP %s %s" % (name, help_text),
                "# TYPE %s %s" % (name, kind),
                "%s%s %s" % (name, label, float(value)),
            ]
        out += self.latencies.rows(label)
        return "\n".join(out) + "\n"

    def chat(self, raw):
        fault = next_fault()  # counted over every chat request, streamed or not
        time.sleep(env_float("FAKE_FRONTEND_S", 0))  # HTTP and tokenizer: before vLLM's clocks
        t_start = time.monotonic()
        try:
            body = json.loads(raw or b"null")
            assert isinstance(body, dict) and isinstance(body.get("messages"), list)
        except (ValueError, AssertionError):
            return self.send_json(400, error_body("Invalid request body", "BadRequestError", 400))
        model = body.get("model") or self.names[0]
        if model not in self.names:
            return self.send_json(
                404, error_body("The model `%s` does not exist." % model, "NotFoundError", 404)
            )
        if os.environ.get("FAKE_NO_CHAT_TEMPLATE") == "1":  # a base model: vLLM 0.24's answer
            return self.send_json(400, error_body(NO_CHAT_TEMPLATE, "BadRequestError", 400))

        # Crude tokenizer: one token per word, plus 10 for the chat template.
        parts = []
        for m in body["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [c.get("text", "") for c in content if isinstance(c, dict)]
        text = " ".join(parts)
        prompt_tokens = len(text.split()) + 10
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.max_len - prompt_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self.send_json(
                400, error_body("max_tokens must be at least 1, got %s." % max_tokens, "BadRequestError", 400)
            )
        if prompt_tokens + max_tokens > self.max_len:
            return self.send_json(
                400,
                error_body(
                    "'max_tokens' or 'max_completion_tokens' is too large: %d. This model's maximum "
                    "context length is %d tokens and your request has %d input tokens (%d > %d - %d)."
                    % (max_tokens, self.max_len, prompt_tokens, max_tokens, self.max_len, prompt_tokens),
                    "BadRequestError",
                    400,
                ),
            )
        if body.get("ignore_eos"):
            n_out = max_tokens
        else:  # deterministic "EOS" so that some answers end early
            n_out = 1 + zlib.crc32(text.encode()) % max_tokens
        finish = "length" if n_out == max_tokens else "stop"

        stream = bool(body.get("stream"))
        fault = fault if stream else ""
        if fault == "short":  # claims "length" although it stopped halfway
            n_out, finish = max(1, max_tokens // 2), "length"
        elif fault in ("error_event", "truncate"):  # the stream breaks off after these
            n_out, finish = min(n_out, 2), None
        elif fault == "no_finish_reason":
            finish = None

        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_out,
            "total_tokens": prompt_tokens + n_out,
        }
        if self.args.enable_log_requests:
            log(
                "INFO Received request %s: prompt_tokens=%d, max_tokens=%d" % (rid, prompt_tokens, max_tokens)
            )

        buffered = []  # no_stream: the whole SSE body, sent in one piece at the end

        def send(data):
            if fault == "no_stream":
                buffered.append(data)
            else:
                self.write_chunk(data)

        def event(choices, **extra):
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            obj.update(extra)
            send(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def choice(delta, reason=None):
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]

        if stream and fault != "no_stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        if stream:
            event(choice({"role": "assistant", "content": ""}))

        e = self.engine
        need = (prompt_tokens + max_tokens) * e.kv
        t_queued = time.monotonic()
        e.admit(rid, need, prompt_tokens)  # queueing before the first token shows in TTFT
        t_admitted = time.monotonic()
        held = prompt_tokens

        def observe():
            self.latencies.observe(
                t_first - t_start,
                t_last - t_start,
                t_admitted - t_queued,
                t_first - t_admitted,
                t_last - t_first,
            )

        try:
            if fault == "keepalive":  # never a token; ends when a write finds the client gone
                while True:
                    time.sleep(0.2)
                    self.write_chunk(b": keep-alive\n\n")
            time.sleep(env_float("FAKE_TTFT_S", 0.02))
            itl = 1.0 if fault == "trickle" else env_float("FAKE_ITL_S", 0.002)
            for i in range(n_out):
                if i:
                    time.sleep(itl)
                e.add_token()
                held += 1
                if stream:
                    event(choice({"content": "tok "}, finish if i == n_out - 1 else None))
                if i == 0:
                    t_first = time.monotonic()
            t_last = time.monotonic()
            if not stream:
                self.send_json(
                    200,
                    {
                        "id": rid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "tok " * n_out},
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                        ],
                        "usage": usage,
                    },
                )
                return observe()
            if fault == "truncate":  # no [DONE], no terminating chunk: the socket just ends
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "error_event":  # what vLLM sends when the engine fails mid-stream
                send(
                    b"data: "
                    + json.dumps(error_body("fake engine error", "InternalServerError", 500)).encode()
                    + b"\n\n"
                )
            elif include_usage:
                event([], usage=usage)
            send(b"data: [DONE]\n\n")
            if fault == "no_stream":
                data = b"".join(buffered)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.wfile.write(b"0\r\n\r\n")  # end of the chunked body
            if fault != "error_event":  # a stream cut short is not a finished request
                observe()
        finally:
            e.finish(need, held)

    def write_chunk(self, data):
        # One SSE event = one HTTP chunk, written in a single send (wfile is unbuffered).
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def log_sleep(engine, level, freed):
    """vLLM's two lines at each sleep: its cumem pool (weights and KV), then the whole process."""
    pool = engine.base - OVERHEAD + engine.pool
    backed_up = engine.base - OVERHEAD if level == 1 else 0
    log(
        "INFO CuMemAllocator: sleep freed %.2f GiB memory in total, of which %.2f GiB is backed up in CPU "
        "and the rest %.2f GiB is discarded directly."
        % (pool / 2**30, backed_up / 2**30, (pool - backed_up) / 2**30)
    )
    log(
        "INFO Sleep mode freed %.2f GiB memory, %.2f GiB memory is still in use."
        % (freed / 2**30, engine.memory() / 2**30)
    )


class Server(ThreadingHTTPServer):
    request_queue_size = 2048  # like uvicorn; the default 5 drops connections in a burst


def fail(msg, rc):
    log("Traceback (most recent call last):\n  ...\n" + msg, err=True)
    sys.exit(rc)


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    mode = os.environ.get("FAKE_MODE", "")
    startup_s = env_float("FAKE_STARTUP_S", 0.3)
    total, used = card_memory()
    kvcached = (
        os.environ.get("ENABLE_KVCACHED", "").lower() in ("true", "1")
        and os.environ.get("KVCACHED_AUTOPATCH") == "1"
    )
    weights, kv_per_token, max_pos = model_sizes(args.model)

    log("INFO fake vllm starting: model=%s kvcached=%s mode=%r" % (args.model, kvcached, mode))
    log("INFO non-default args: %s" % non_default_args(parser, args))
    fault = os.environ.get("FAKE_STREAM_FAULT", "")
    if fault and fault not in STREAM_FAULTS:  # a typo would silently test the normal path
        fail("ValueError: unknown FAKE_STREAM_FAULT %r" % fault, 2)
    log("INFO Model loading took %.2f GiB memory and 0.01 seconds" % (weights / 2**30))
    if mode == "crash":
        time.sleep(startup_s)
        fail("ValueError: fake start-up failure", 3)
    vllm_version = installed("vllm", "0.24.0")
    runner = model_runner(vllm_version, architecture(args.model))
    if runner == "V2":
        log("INFO Using V2 Model Runner")
    refusal = kvcached and kvcached_refusal(vllm_version, runner)
    if refusal:
        time.sleep(startup_s)
        fail("(EngineCore pid=%d) %s" % (os.getpid(), refusal), 1)

    pool = 0
    if not kvcached:
        if args.kv_cache_memory_bytes is not None:
            pool = args.kv_cache_memory_bytes
        else:
            # Real vLLM refuses to start if other processes already use the memory it wants.
            free = total - used
            want = args.gpu_memory_utilization * total
            if free < want:
                fail(
                    "ValueError: Free memory on device (%.2f/%.2f GiB) on startup is less than "
                    "desired GPU memory utilization (%.2f, %.2f GiB). Decrease GPU memory "
                    "utilization or reduce GPU memory used by other processes."
                    % (free / 2**30, total / 2**30, args.gpu_memory_utilization, want / 2**30),
                    1,
                )
            pool = int(want) - weights - OVERHEAD
            if pool <= 0:
                fail(
                    "ValueError: No available memory for the cache blocks. Try increasing "
                    "`gpu_memory_utilization` when initializing the engine.",
                    1,
                )

    engine = Engine(weights, kv_per_token, kvcached, pool, seg_total=int(0.95 * total) - weights - OVERHEAD)
    engine.sleep_mode = args.enable_sleep_mode
    if not kvcached and args.kv_cache_memory_bytes is not None:
        log("INFO Initial free memory, reserved %.2f GiB memory for KV Cache as specified" % (pool / 2**30))
    elif not kvcached:
        log("INFO Available KV cache memory: %.2f GiB" % (pool / 2**30))
    Handler.args, Handler.engine, Handler.latencies = args, engine, Latencies()
    Handler.api_key = args.api_key or os.environ.get("VLLM_API_KEY")  # as vLLM does
    Handler.names = args.served_model_name or [args.model]
    Handler.max_len = args.max_model_len or max_pos

    def on_signal(signum, frame):
        # A stop signals the process group and each process, so a second signal can arrive while this
        # handler runs: it must neither block on the log's lock (held by the first) nor start again.
        if (
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        ):
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("INFO Shutting down (signal %d)" % signum)
        engine.cleanup()
        os._exit(0)

    # Set before spawning: the engine child inherits SIG_IGN (and Python keeps an inherited
    # SIG_IGN for SIGINT rather than installing its KeyboardInterrupt handler).
    if mode == "ignore_sigterm":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN if mode == "ignore_sigint" else on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    try:
        # vLLM binds the port first (so it is reserved) but only listens once ready:
        # until then connections are refused.
        server = Server((args.host, args.port), Handler, bind_and_activate=False)
        try:
            server.server_bind()
        except OSError as exc:
            fail("OSError: %s" % exc, 1)
        engine.start(grandchild=(mode == "grandchild"))
        if mode == "hang":
            while True:
                time.sleep(3600)
        time.sleep(startup_s)
        engine.become_ready()
        if kvcached:
            log("INFO kvcached: limit %d MiB in %s" % (engine.seg_total // MIB, engine.seg_path))
        else:
            log("INFO KV cache pool: %d tokens" % (pool // kv_per_token))
        try:
            server.server_activate()
        except OSError as exc:
            fail("OSError: %s" % exc, 1)
        log("INFO Starting vLLM API server 0 on http://%s:%d" % (args.host, args.port))
        log("INFO:     Uvicorn running on http://%s:%d (Press CTRL+C to quit)" % (args.host, args.port))
        server.serve_forever(poll_interval=0.1)
    finally:
        engine.cleanup()


if __name__ == "__main__":
    main()
