"""Abuse test of ``omnisearchsage-serve``: oversized, slow, truncated and malformed requests beside valid traffic.

What it does, in one command (``python bench/serve_abuse.py``):

1. Builds the tiny random query tower and the 10,000-pin random index of ``bench/serve_load.py``
   (``build_models``), and starts ``omnisearchsage-serve`` with its default limits on 127.0.0.1, in its own
   process, its stderr going to a file (read afterwards for tracebacks).
2. Alone: a valid client in a separate process sends ``POST /search`` (cached queries, ``k`` 10) at a fixed
   rate over keep-alive connections for ``--seconds``; latency is measured from writing a request to reading
   its whole response.
3. Under abuse: the same valid client for the same time, while this process sends, all at once and each a
   bounded number of times:
   - 100 MB bodies, declared by ``Content-Length`` (refused before reading: 413) and chunked without a length
     (refused once 64 KB have streamed: 413); the sender keeps writing until the answer or a reset;
   - slowloris: connections that open and send nothing, that send their headers one byte a second, and
     that send their body one byte a second after complete headers (closed after the header / body timeout);
   - oversized headers: one 1 MB header, and 2,000 headers of 100 bytes (431);
   - disconnects: bodies cut off halfway by closing the connection (counted apart, no traceback);
   - malformed JSON and bad fields carrying a marker string: the answer must be a 4xx that does not contain
     the marker.
4. Reports the statuses per kind, time to close each slowloris kind, the server's RSS (sampled every
   50 ms, and its peak), the server's own counters (``/metrics``), tracebacks in its log, and the valid
   client's p50/p99 alone and under abuse, in ``bench/results/serve_abuse.{json,md}``.

Network: every connection goes to 127.0.0.1; every loop is bounded by count and time.

Usage:
    python bench/serve_abuse.py [--seconds 25] [--rate 200] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from serve_load import HOST, build_models, free_port, generate_queries

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20
MARKER = "zq-echo-marker-7f3a"  # must never come back in an error body
HEADER_TIMEOUT = 10.0  # the service's defaults (HttpLimits), which this run measures
BODY_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------------- raw HTTP


def post_head(path: str, length: int | None, extra: str = "") -> bytes:
    """The request line and headers of a JSON POST; ``length`` None sends a chunked body."""
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n{size}\r\n{extra}\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one response (``Content-Length`` framed, as every answer of the service is)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return int(head[9:12]), await reader.readexactly(length)


async def answer_or_close(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """``"<status>"`` and its body, or ``"closed"`` / ``"reset"`` if the server closed without answering."""
    try:
        status, body = await read_response(reader)
        return str(status), body
    except asyncio.IncompleteReadError:
        return "closed", b""
    except ConnectionError:
        return "reset", b""


# --------------------------------------------------------------------------------------------------- valid client


def _valid_client_process(port: int, queries: list[str], seconds: float, rate: float, connections: int, out: str):
    import uvloop

    Path(out).write_text(json.dumps(uvloop.run(_valid_client(port, queries, seconds, rate, connections))))


async def _valid_client(port: int, queries: list[str], seconds: float, rate: float, connections: int) -> dict:
    """Each connection sends on a fixed schedule (``rate / connections`` per second; at once when late)."""
    import orjson

    bodies = [orjson.dumps({"query": q, "k": 10}) for q in queries]
    requests = [post_head("/search", len(b)) + b for b in bodies]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    interval = connections / rate
    start = time.perf_counter()

    async def connection(offset: int):
        reader, writer = await asyncio.open_connection(HOST, port)
        rng = np.random.default_rng(offset)
        for i in range(int(seconds / interval)):
            await asyncio.sleep(max(0.0, start + (i + offset / connections) * interval - time.perf_counter()))
            sent = time.perf_counter()
            writer.write(requests[rng.integers(len(requests))])
            status, _ = await read_response(reader)
            latencies.append((time.perf_counter() - sent) * 1000)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        writer.close()

    await asyncio.gather(*(connection(c) for c in range(connections)))
    ms = np.asarray(latencies)
    return {
        "requests": len(latencies),
        "seconds": round(time.perf_counter() - start, 1),
        "statuses": statuses,
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}
        | {"max": round(float(ms.max()), 3)},
    }


def run_valid_client(port: int, queries: list[str], args: argparse.Namespace, out: Path) -> multiprocessing.Process:
    client = multiprocessing.get_context("spawn").Process(
        target=_valid_client_process, args=(port, queries, args.seconds, args.rate, args.connections, str(out))
    )
    client.start()
    return client


# --------------------------------------------------------------------------------------------------- abuse


async def big_body(port: int, chunked: bool) -> dict:
    """Send a 100 MB body (declared or chunked) 1 MB at a time until the server answers or cuts us off."""
    reader, writer = await asyncio.open_connection(HOST, port)
    start = time.perf_counter()
    writer.write(post_head("/search", None if chunked else 100 * MB))
    answer = asyncio.ensure_future(answer_or_close(reader))
    chunk = b"x" * MB
    sent = 0
    try:
        while sent < 100 * MB and not answer.done():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await writer.drain()
            sent += MB
    except ConnectionError:
        pass  # the server closed while we wrote: the answer, if any, is already in our receive buffer
    status, body = await asyncio.wait_for(answer, 30)
    writer.close()
    return {"status": status, "seconds": time.perf_counter() - start, "mb_sent": sent // MB, "body": body}


async def slow(port: int, kind: str, seconds: float) -> dict:
    """A slowloris connection: ``silent`` sends nothing, ``headers`` and ``body`` trickle one byte a second.

    Gives up (status ``"open"``) after ``seconds``; ``seconds`` in the result is the time until the server answered
    or closed.
    """
    reader, writer = await asyncio.open_connection(HOST, port)
    start = time.perf_counter()
    first, trickle = {
        "silent": (b"", b""),
        "headers": (f"POST /search HTTP/1.1\r\nHost: {HOST}\r\n".encode(), b"X-Slow: " + b"a" * 1000),
        "body": (post_head("/search", 1000), b"x" * 1000),
    }[kind]
    writer.write(first)
    answer = asyncio.ensure_future(answer_or_close(reader))
    try:
        for byte in trickle:
            if answer.done() or time.perf_counter() - start > seconds:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait([answer], timeout=1.0)
        status, _ = await asyncio.wait_for(answer, max(0.1, seconds - (time.perf_counter() - start)))
    except (ConnectionError, TimeoutError):
        status = "open" if not answer.done() else "reset"
    writer.close()
    return {"status": status, "seconds": time.perf_counter() - start}


async def big_headers(port: int, many: bool) -> dict:
    reader, writer = await asyncio.open_connection(HOST, port)
    headers = "".join(f"X-H{i}: {'a' * 100}\r\n" for i in range(2000)) if many else f"X-Big: {'a' * MB}\r\n"
    try:
        writer.write(post_head("/search", 2, headers) + b"{}")
        await writer.drain()
    except ConnectionError:
        pass
    status, body = await asyncio.wait_for(answer_or_close(reader), 30)
    writer.close()
    return {"status": status, "body": body}


async def disconnect_mid_body(port: int) -> dict:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(post_head("/search", 1000) + b'{"query": "' + b"a" * 500)
    await writer.drain()
    await asyncio.sleep(0.05)  # the handler is reading the body
    writer.close()
    return {"status": "client closed"}


MALFORMED = [
    f'{{"query": "{MARKER}"'.encode(),  # truncated
    f'{{"query": {MARKER}}}'.encode(),  # not JSON
    f'["{MARKER}"]'.encode(),  # not an object
    f'{{"query": ["{MARKER}"]}}'.encode(),  # wrong type
    f'{{"query": "x", "k": "{MARKER}"}}'.encode(),
    f'{{"query": "x", "entity_types": ["{MARKER}"]}}'.encode(),
    f'{{"query": "{MARKER * 100}"}}'.encode(),  # over the query length limit
    f'{{"query": "x", "{MARKER}": 1'.encode(),
    MARKER.encode() + b"\xff\xfe",  # not UTF-8
]


async def malformed(port: int, body: bytes) -> dict:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(post_head("/search", len(body)) + body)
    status, answer = await answer_or_close(reader)
    writer.close()
    return {"status": status, "body": answer}


async def abuse(port: int, seconds: float) -> dict[str, list[dict]]:
    """Every kind of abuse, concurrently, bounded in count; returns the outcomes per kind."""

    async def repeat(make, count: int, spacing: float) -> list[dict]:
        results = []
        for _ in range(count):
            results.append(await make())
            await asyncio.sleep(spacing)
        return results

    async def many(make, count: int) -> list[dict]:
        return list(await asyncio.gather(*(make() for _ in range(count))))

    slow_for = max(HEADER_TIMEOUT, BODY_TIMEOUT) + 5
    bodies = iter(MALFORMED * 30)
    kinds = {
        "body_100mb_content_length": repeat(lambda: big_body(port, chunked=False), 8, seconds / 10),
        "body_100mb_chunked": repeat(lambda: big_body(port, chunked=True), 8, seconds / 10),
        "slowloris_silent": many(lambda: slow(port, "silent", slow_for), 50),
        "slowloris_headers": many(lambda: slow(port, "headers", slow_for), 50),
        "slowloris_body": many(lambda: slow(port, "body", slow_for), 50),
        "headers_1mb": repeat(lambda: big_headers(port, many=False), 10, seconds / 20),
        "headers_2000": repeat(lambda: big_headers(port, many=True), 10, seconds / 20),
        "disconnect_mid_body": repeat(lambda: disconnect_mid_body(port), 100, seconds / 200),
        "malformed": repeat(lambda: malformed(port, next(bodies)), len(MALFORMED) * 30, seconds / 600),
    }
    outcomes = await asyncio.gather(*kinds.values())
    return dict(zip(kinds, outcomes, strict=True))


# --------------------------------------------------------------------------------------------------- server


class RssSampler:
    """Samples a process's resident memory every 50 ms in a thread."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def _run(self):
        while not self.stop.wait(0.05):
            self.samples.append(self.rss_mb())

    def take(self) -> list[float]:
        taken, self.samples = self.samples, []
        return taken


def start_server(folder: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "omnisearchsage_hf.serving.cli", "serve", "--query-model",
               str(folder / "query_tower"), "--index", str(folder / "index"),
               "--host", HOST, "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 300
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"The server did not start: {log.read_text()}") from None
            time.sleep(0.2)


def metrics(port: int) -> dict[str, float]:
    import httpx

    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#") and "_created" not in line
    }


def warm(port: int, queries: list[str]) -> None:
    import httpx

    with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30) as client:
        for query in queries:
            client.post("/search", json={"query": query, "k": 10}).raise_for_status()


# --------------------------------------------------------------------------------------------------- report


def summarise(outcomes: dict[str, list[dict]]) -> dict:
    summary = {}
    for kind, results in outcomes.items():
        statuses: dict[str, int] = {}
        for result in results:
            statuses[result["status"]] = statuses.get(result["status"], 0) + 1
        entry: dict = {"count": len(results), "statuses": statuses}
        if results and "seconds" in results[0]:
            seconds = [r["seconds"] for r in results]
            entry["seconds"] = {"min": round(min(seconds), 2), "max": round(max(seconds), 2)}
        if results and "mb_sent" in results[0]:
            entry["mb_sent_max"] = max(r["mb_sent"] for r in results)
        if results and "body" in results[0]:
            entry["echoed_marker"] = sum(MARKER.encode() in r["body"] for r in results)
            entry["longest_error_bytes"] = max(len(r["body"]) for r in results)
        summary[kind] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="Length of each phase (default 25, >= 15).")
    parser.add_argument("--rate", type=float, default=200.0, help="Valid requests per second (default 200).")
    parser.add_argument("--connections", type=int, default=4, help="Keep-alive connections of the valid client.")
    args = parser.parse_args()
    if args.seconds < HEADER_TIMEOUT + 5 or args.rate <= 0 or args.connections < 1:
        parser.error(f"--seconds must be >= {HEADER_TIMEOUT + 5:g}, --rate > 0 and --connections >= 1.")
    from omnisearchsage_hf.atomic import write_text_atomically

    queries = generate_queries(2000)
    with tempfile.TemporaryDirectory(prefix="serve_abuse_") as tmp:
        folder = Path(tmp)
        tower = build_models("tiny", folder)
        port = free_port()
        log = folder / "server.log"
        server = start_server(folder, port, log)
        try:
            warm(port, queries)
            sampler = RssSampler(server.pid)
            time.sleep(0.5)
            baseline_mb = float(np.median(sampler.take()))

            client = run_valid_client(port, queries, args, folder / "alone.json")
            client.join(args.seconds + 60)
            alone = json.loads((folder / "alone.json").read_text())
            rss_alone = sampler.take()

            client = run_valid_client(port, queries, args, folder / "abused.json")
            import uvloop

            outcomes = uvloop.run(abuse(port, args.seconds))
            client.join(args.seconds + 60)
            abused = json.loads((folder / "abused.json").read_text())
            rss_abused = sampler.take()
            peak_mb = sampler.rss_mb("VmHWM")
            sampler.stop.set()
            counters = metrics(port)
        finally:
            server.terminate()
            server.wait(timeout=30)
        server_log = log.read_text(errors="replace")

    import torch

    statuses = {
        key.split('status="')[1].rstrip('"}'): int(value)
        for key, value in counters.items()
        if key.startswith("omnisearchsage_requests_total{") and 'endpoint="search"' in key
    }
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"load average before the run {os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "query_tower": tower,
        "server": "omnisearchsage-serve with its default limits (64 KB bodies, 16 KB headers, 10 s header and body "
        "timeouts, 5 s keep-alive), 127.0.0.1",
        "valid_client": f"separate process, {args.connections} keep-alive connections, {args.rate:g} POST /search "
        f"per second in all (2,000 cached queries, k 10), {args.seconds:g} s per phase",
        "alone": alone,
        "under_abuse": abused,
        "p99_ratio_abuse_over_alone": round(abused["latency_ms"]["p99"] / alone["latency_ms"]["p99"], 2),
        "abuse": summarise(outcomes),
        "server_rss_mb": {
            "before": round(baseline_mb, 1),
            "max_alone": round(max(rss_alone), 1),
            "max_under_abuse": round(max(rss_abused), 1),
            "peak_VmHWM": round(peak_mb, 1),
        },
        "server_counters": {
            "search_requests_by_status": statuses,
            "client_disconnects": {
                key.split('"')[1]: int(value)
                for key, value in counters.items()
                if key.startswith("omnisearchsage_client_disconnects_total{")
            },
            "connections_closed": {
                key.split('"')[1]: int(value)
                for key, value in counters.items()
                if key.startswith("omnisearchsage_connections_closed_total{")
            },
        },
        "server_log": {
            "tracebacks": server_log.count("Traceback"),
            "lines": [line[:200] for line in server_log.splitlines()[:20]],  # stderr from start-up to the end
        },
    }
    five_xx = sum(v for k, v in statuses.items() if k.startswith("5")) + sum(
        v for s in (alone, abused) for k, v in s["statuses"].items() if k.startswith("5")
    )
    slowest = {kind: results["abuse"][f"slowloris_{kind}"]["seconds"]["max"] for kind in ("silent", "headers", "body")}
    results["targets"] = {
        "100MB bodies refused with 413": all(
            results["abuse"][k]["statuses"] == {"413": 8} for k in ("body_100mb_content_length", "body_100mb_chunked")
        ),
        "server RSS grew < 100 MB": max(rss_abused) - baseline_mb < 100,
        f"slow headers closed within the header timeout ({HEADER_TIMEOUT:g} s + 1 s)": max(
            slowest["silent"], slowest["headers"]
        )
        <= HEADER_TIMEOUT + 1,
        f"slow bodies closed within the body timeout ({BODY_TIMEOUT:g} s + 1 s)": slowest["body"] <= BODY_TIMEOUT + 1,
        "no 5xx": five_xx == 0,
        "no request echoed in an error": all(v.get("echoed_marker", 0) == 0 for v in results["abuse"].values()),
        "no traceback in the server log": results["server_log"]["tracebacks"] == 0,
        "valid p99 under abuse <= 3x alone": results["p99_ratio_abuse_over_alone"] <= 3,
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomically(RESULTS / "serve_abuse.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(RESULTS / "serve_abuse.md", render_markdown(results, args))
    print(json.dumps(results, indent=2))


def render_markdown(results: dict, args: argparse.Namespace) -> str:
    alone, abused = results["alone"], results["under_abuse"]
    lines = [
        "# Service under abuse (`python bench/serve_abuse.py`)",
        "",
        f"Command: `python bench/serve_abuse.py --seconds {args.seconds:g} --rate {args.rate:g} "
        f"--connections {args.connections}`",
        "",
        f"- Machine: {results['machine']}; torch {results['torch']}. Server, valid client and abusive client share "
        "the cores.",
        f"- Query tower (on CPU): {results['query_tower']}; index: 10,000 random 256-d pins.",
        f"- Server: {results['server']}.",
        f"- Valid client: {results['valid_client']}. Latency from writing a request to reading its whole response.",
        "",
        "| valid traffic | requests | statuses | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("alone", alone), ("under abuse", abused)):
        lat = run["latency_ms"]
        lines.append(f"| {name} | {run['requests']} | {run['statuses']} | {lat['p50']} | {lat['p99']} | {lat['max']} |")
    lines += [
        "",
        f"p99 under abuse / alone: **{results['p99_ratio_abuse_over_alone']}x**.",
        "",
        "| abuse (all at once, during the second phase) | count | outcomes | seconds to answer or close | notes |",
        "|---|---|---|---|---|",
    ]
    for kind, entry in results["abuse"].items():
        notes = []
        if "mb_sent_max" in entry:
            notes.append(f"the client wrote at most {entry['mb_sent_max']} MB before it read the answer")
        if "echoed_marker" in entry:
            notes.append(f"marker echoed {entry['echoed_marker']}x, longest body {entry['longest_error_bytes']} B")
        seconds = entry.get("seconds")
        span = f"{seconds['min']}-{seconds['max']}" if seconds else ""
        lines.append(f"| {kind} | {entry['count']} | {entry['statuses']} | {span} | {'; '.join(notes)} |")
    rss = results["server_rss_mb"]
    counters = results["server_counters"]
    lines += [
        "",
        f"Server RSS: {rss['before']} MB before, at most {rss['max_alone']} MB alone and {rss['max_under_abuse']} MB "
        f"under abuse (sampled every 50 ms; peak VmHWM {rss['peak_VmHWM']} MB).",
        "",
        f"Server counters after both phases: `/search` requests by status {counters['search_requests_by_status']}; "
        f"client disconnects {counters['client_disconnects']}; connections closed by the server "
        f"{counters['connections_closed']}. Tracebacks in the server's log: {results['server_log']['tracebacks']}; "
        f"its {len(results['server_log']['lines'])} line(s): {results['server_log']['lines']}.",
        "",
        "Targets (issue 15): "
        + ", ".join(f"{name}: {'met' if ok else '**not met**'}" for name, ok in results["targets"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
