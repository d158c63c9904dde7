"""``tq bench``: the scenarios of benchmarks/README.md against a real broker process.

Each scenario runs ``repeats`` times and reports the median with min and max: the machines are
noisy, so single numbers mean little. Targets live here, next to the measurements, never in
timed unit tests.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tq.bench.procs import BrokerProc, start_worker
from tq.client import AsyncClient, Client
from tq.model import ErrorInfo, new_ids
from tq.protocol.messages import Ack, ClaimTask, Leased, Outcome, ResultBatch, TaskSpec
from tq.spin import CLIENT_SPIN_US

PAYLOAD = msgspec.json.encode(
    {"user": "alice@example.com", "action": "thumbnail", "size": [640, 480], "pad": "x" * 120}
)

# scenario -> (comparison, target, unit)
TARGETS: dict[str, tuple[str, float, str]] = {
    "submit-batch": (">=", 150_000, "tasks/s"),
    "submit-pipelined": (">=", 40_000, "tasks/s"),
    "submit-latency-p50": ("<=", 0.3, "ms"),
    "submit-latency-p99": ("<=", 1.0, "ms"),
    "open-loop-p99": ("<=", 2.0, "ms"),
    "end-to-end": (">=", 20_000, "tasks/s"),
    "dispatch-latency-p99": ("<=", 2.0, "ms"),
    "memory-100k": ("<=", 250, "MB"),
    "memory-1m": ("<=", 250, "MB"),
    "recovery-1m": ("<=", 3.0, "s"),
    "cluster-submit-batch": (">=", 40_000, "tasks/s"),
    "cluster-end-to-end": ("", 0, "tasks/s"),  # measured, no target set
    "cluster-failover": ("<=", 3.0, "s"),
    "export-1m": ("<=", 10.0, "s"),
    "export-1m-fill": ("", 0, "s"),  # measured, no target set
}


UNITS = {"p50": "ms", "p99": "ms", "p99.9": "ms", "lag-p99": "ms"}


@dataclass(frozen=True)
class Sizes:
    batch_total: int = 200_000
    batch_size: int = 500
    pipelined_total: int = 50_000
    in_flight: int = 256
    sequential: int = 2_000
    open_loop_s: float = 3.0
    rate: int = 2_000
    e2e_tasks: int = 50_000
    dispatch_samples: int = 300
    memory_small: int = 100_000
    memory_large: int = 1_000_000
    cluster_tasks: int = 50_000
    export_tasks: int = 1_000_000
    repeats: int = 3
    # The producers' AsyncClient(spin_us=...) in the submit and dispatch scenarios
    client_spin_us: int = CLIENT_SPIN_US


QUICK = Sizes(
    batch_total=2_000,
    batch_size=100,
    pipelined_total=500,
    in_flight=32,
    sequential=50,
    open_loop_s=0.3,
    rate=200,
    e2e_tasks=500,
    dispatch_samples=10,
    memory_small=1_000,
    memory_large=3_000,
    cluster_tasks=1_000,
    export_tasks=3_000,
    repeats=1,
)


@dataclass
class Result:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, values in self.samples.items():
            unit = TARGETS.get(name, ("", 0, ""))[2] or UNITS.get(name.rsplit("-", 1)[-1], "")
            out[name] = {
                "median": round(statistics.median(values), 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
                "unit": unit,
            }
        return out


def _specs(n: int, name: str = "echo") -> list[TaskSpec]:
    return [TaskSpec(tid, name, PAYLOAD) for tid in new_ids.many(n)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _fill(client: AsyncClient, total: int, batch: int, in_flight: int = 8) -> None:
    sem = asyncio.Semaphore(in_flight)

    async def one(n: int) -> None:
        async with sem:
            await client.submit_specs(_specs(n))

    await asyncio.gather(*(one(min(batch, total - i)) for i in range(0, total, batch)))


def _run(coro: Coroutine[Any, Any, Any], fast_loop: bool) -> Any:
    """Run a scenario's client. On uvloop when installed, as `tq broker` and `tq worker` run:
    the bench client shares the two cores with the broker, so its own overhead counts.

    The objects alive now (the harness, rich, typer, earlier scenarios' leftovers) are moved
    out of the collector's reach first, as ``tq broker`` does with its own after start: a full
    collection in this process took 15-16 ms during the open-loop run (timed with
    ``gc.callbacks``), a pause of the measuring client that showed up as the broker's p99
    (open-loop p99 3.6 / 1.9 ms without, 1.8 / 1.3 ms with, alternating)."""
    gc.collect()
    gc.freeze()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if fast_loop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def submit_batch(url: str, sizes: Sizes) -> float:
    async with AsyncClient(url, spin_us=sizes.client_spin_us) as client:
        batches = [_specs(sizes.batch_size) for _ in range(sizes.batch_total // sizes.batch_size)]
        sem = asyncio.Semaphore(4)

        async def one(specs: list[TaskSpec]) -> None:
            async with sem:
                await client.submit_specs(specs)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in batches))
        return sizes.batch_total / (time.perf_counter() - t0)


async def submit_pipelined(url: str, sizes: Sizes) -> float:
    async with AsyncClient(url, spin_us=sizes.client_spin_us) as client:
        each = max(1, sizes.pipelined_total // sizes.in_flight)

        async def lane() -> None:  # one of `in_flight` submitters, each one request at a time
            for _ in range(each):
                await client.submit("echo", PAYLOAD)

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(sizes.in_flight)))
        return each * sizes.in_flight / (time.perf_counter() - t0)


async def submit_latency(url: str, sizes: Sizes) -> tuple[float, float, float]:
    async with AsyncClient(url, spin_us=sizes.client_spin_us) as client:
        for _ in range(20):
            await client.submit("echo", PAYLOAD)
        lat: list[float] = []
        for _ in range(sizes.sequential):
            t0 = time.perf_counter()
            await client.submit("echo", PAYLOAD)
            lat.append((time.perf_counter() - t0) * 1000)
        return _pct(lat, 0.5), _pct(lat, 0.99), _pct(lat, 0.999)


def _sync_sequential(url: str, sizes: Sizes) -> tuple[float, float]:
    """The same sequential submits through the blocking ``Client`` (what a web app's request
    handler uses), from a thread of its own with no event loop running in it."""
    with Client(url, spin_us=sizes.client_spin_us) as client:
        for _ in range(20):
            client.submit("echo", PAYLOAD)
        lat: list[float] = []
        for _ in range(sizes.sequential):
            t0 = time.perf_counter()
            client.submit("echo", PAYLOAD)
            lat.append((time.perf_counter() - t0) * 1000)
        return _pct(lat, 0.5), _pct(lat, 0.99)


async def submit_latency_sync(url: str, sizes: Sizes) -> tuple[float, float]:
    return await asyncio.to_thread(_sync_sequential, url, sizes)


async def open_loop(url: str, sizes: Sizes) -> tuple[float, float, float]:
    """Submits at a fixed offered rate: a slow reply never delays the next send (no coordinated
    omission). Returns p50 and p99 of the submit latency and the p99 lag of sends behind
    schedule (the client's timer granularity)."""
    async with AsyncClient(url, spin_us=sizes.client_spin_us) as client:
        loop = asyncio.get_running_loop()
        n = int(sizes.open_loop_s * sizes.rate)
        lat: list[float] = []
        lag: list[float] = []
        start = loop.time() + 0.05

        async def one(due: float) -> None:
            # Timed from the actual send: the client's own timer granularity (uvloop: 1 ms) is
            # not the broker's latency. How late the sends were is reported separately.
            sent = loop.time()
            lag.append((sent - due) * 1000)
            await client.submit("echo", PAYLOAD)
            lat.append((loop.time() - sent) * 1000)

        tasks = []
        for i in range(n):
            due = start + i / sizes.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
        return _pct(lat, 0.5), _pct(lat, 0.99), _pct(lag, 0.99)


async def end_to_end(url: str, sizes: Sizes) -> float:
    """Tasks already pending, then one real ``tq worker`` process drains them; measured from the
    first lease to the last durable result, using the broker's own timestamps."""
    async with AsyncClient(url) as client:
        await _fill(client, sizes.e2e_tasks, 500)
    return await end_to_end_on(url, sizes.e2e_tasks)


async def end_to_end_on(url: str, n: int) -> float:
    async with AsyncClient(url) as client:
        base = (await client.stats())["states"]["completed"]
        worker = start_worker(url, "--concurrency", "256")
        try:
            while (await client.stats())["states"]["completed"] - base < n:
                if worker.poll() is not None:
                    raise RuntimeError("worker exited early")
                await asyncio.sleep(0.1)
        finally:
            worker.terminate()
            worker.wait()
        first, last = 2**63, 0
        after: str | None = None
        while True:
            tasks, after = await client.list_page("completed", limit=10_000, after=after)
            for t in tasks:
                first = min(first, t.started_at_ms)
                last = max(last, t.finished_at_ms)
            if after is None:
                break
        return n / max(0.001, (last - first) / 1000)


async def dispatch_latency(url: str, sizes: Sizes) -> tuple[float, float, float, float]:
    """Submit acknowledged -> handler started (and submit sent -> started), on an idle broker
    with one worker parked on a claim."""
    worker = start_worker(url, "--concurrency", "4")
    try:
        async with AsyncClient(url, spin_us=sizes.client_spin_us) as client:
            tid = await client.submit("timestamp", None)
            await client.wait(tid, timeout_s=30)  # worker is up and parked on a claim
            lat: list[float] = []
            from_send: list[float] = []
            for _ in range(sizes.dispatch_samples):
                # The broker sends the ack and the lease after the same fsync, so the handler
                # often starts before the producer has read its ack: "acknowledged -> started"
                # is then 0. The stricter "submit sent -> started" (its own fsync included) is
                # reported beside it.
                sent_ns = time.time_ns()
                tid = await client.submit("timestamp", None)
                acked_ns = time.time_ns()
                info = await client.wait(tid, timeout_s=30)
                started_ns = info.result["started_ns"]
                lat.append(max(0.0, (started_ns - acked_ns) / 1e6))
                from_send.append((started_ns - sent_ns) / 1e6)
                await asyncio.sleep(0.005)
            return _pct(lat, 0.5), _pct(lat, 0.99), _pct(from_send, 0.5), _pct(from_send, 0.99)
    finally:
        worker.terminate()
        worker.wait()


async def _first_claim(url: str) -> None:
    client = AsyncClient(url, role="worker", connect_timeout_s=60)
    try:
        while True:
            leased = await client.call(
                lambda rid: ClaimTask(rid, ["default"], 1, 5_000), Leased, timeout_s=60
            )
            if leased.tasks:
                return
    finally:
        await client.close()


def memory_and_recovery(sizes: Sizes, n: int, with_recovery: bool) -> tuple[float, float | None]:
    broker = BrokerProc()
    broker.start()
    try:

        async def fill() -> None:
            async with AsyncClient(broker.url) as client:
                await _fill(client, n, 1000)

        asyncio.run(fill())
        rss = broker.rss_mb()
        if not with_recovery:
            return rss, None
        broker.kill9()
        broker.start(timeout_s=120)
        asyncio.run(_first_claim(broker.url))
        return rss, time.perf_counter() - broker.started_at
    finally:
        broker.stop()


# --- export ----------------------------------------------------------------------------------

EXPORT_NAMES = ("echo", "resize", "email")
EXPORT_QUEUES = ("default", "reports")
RESULT = msgspec.json.encode({"ok": True})


async def fill_finished(url: str, n: int, fail_every: int = 50) -> None:
    """Put ``n`` finished tasks in the broker as fast as the protocol allows: batched submits
    (three task names over two queues, no retries), then a stand-in worker that claims 10,000 at
    a time and reports them all in one result batch without running anything. Every
    ``fail_every``-th task fails and goes to the dead-letter queue. A real ``tq worker`` drains
    about 20,000 tasks/s, which would make filling a million the whole benchmark."""
    async with AsyncClient(url) as client:
        sem = asyncio.Semaphore(4)

        async def submit(start: int, count: int) -> None:
            specs = [
                TaskSpec(
                    tid,
                    EXPORT_NAMES[(start + i) % len(EXPORT_NAMES)],
                    PAYLOAD,
                    EXPORT_QUEUES[(start + i) % len(EXPORT_QUEUES)],
                    max_retries=0,
                )
                for i, tid in enumerate(new_ids.many(count))
            ]
            async with sem:
                await client.submit_specs(specs)

        step = 10_000
        await asyncio.gather(*(submit(i, min(step, n - i)) for i in range(0, n, step)))

    worker = AsyncClient(
        url,
        role="worker",
        client_id=f"bench-export-{new_ids.new()}",
        hello_extra={"concurrency": 10_000, "queues": list(EXPORT_QUEUES)},
    )
    failure = ErrorInfo("ValueError", "bad input")
    try:

        async def lane() -> None:  # claim 10,000, report them, until nothing is left
            while True:
                leased = await worker.call(
                    lambda rid: ClaimTask(rid, list(EXPORT_QUEUES), 10_000, 0), Leased
                )
                if not leased.tasks:
                    return
                outcomes = [
                    Outcome(lt.task.id, lt.token, True, RESULT)
                    if (i + 1) % fail_every
                    else Outcome(lt.task.id, lt.token, False, None, failure)
                    for i, lt in enumerate(leased.tasks)
                ]
                report = functools.partial(ResultBatch, outcomes=outcomes)
                await worker.call(report, Ack, retry=False)

        await asyncio.gather(lane(), lane())
    finally:
        await worker.close()


def export_1m(sizes: Sizes) -> tuple[float, list[float]]:
    """Fill a fresh broker with ``export_tasks`` finished tasks once (seconds returned), then
    time ``tq export --out X.parquet`` over all of them ``repeats`` times: the whole command as
    a user runs it, interpreter start-up included."""
    broker = BrokerProc()
    broker.start()
    out_dir = tempfile.mkdtemp(prefix="tq-bench-export-")
    try:
        t0 = time.perf_counter()
        asyncio.run(fill_finished(broker.url, sizes.export_tasks))
        fill_s = time.perf_counter() - t0
        out = os.path.join(out_dir, "tasks.parquet")
        cmd = [sys.executable, "-m", "tq", "export", "-b", broker.url, "--out", out, "--quiet"]
        env = {**os.environ, "XDG_STATE_HOME": out_dir}  # keep the user's latest export
        samples: list[float] = []
        for _ in range(sizes.repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL)
            samples.append(time.perf_counter() - t0)
        return fill_s, samples
    finally:
        broker.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


async def _leader_url(client: AsyncClient) -> str:
    stats = await client.stats()
    return str(stats["cluster"].get("leader_client") or "")


def cluster_scenarios(sizes: Sizes) -> tuple[float, float, float]:
    """Through a 3-node cluster: batched submits, one worker draining them, and failover (kill
    -9 the leader, time until a write is accepted again)."""
    from tq.bench.procs import ClusterProcs

    cluster = ClusterProcs()
    try:
        cluster.start()

        async def throughput() -> tuple[float, float]:
            async with AsyncClient(cluster.url) as client:
                await client.submit("echo", PAYLOAD)  # waits out the first election
                t0 = time.perf_counter()
                await _fill(client, sizes.cluster_tasks, 500)
                submit_rate = sizes.cluster_tasks / (time.perf_counter() - t0)
            e2e = await end_to_end_on(cluster.url, sizes.cluster_tasks)
            return submit_rate, e2e

        submit_rate, e2e = asyncio.run(throughput())

        async def failover() -> float:
            async with AsyncClient(cluster.url, connect_timeout_s=30) as client:
                leader = await _leader_url(client)
                victim = next(n for n in cluster.nodes if n.url == leader)
                victim.kill9()
                t0 = time.perf_counter()
                await client.submit("echo", PAYLOAD)
                return time.perf_counter() - t0

        return submit_rate, e2e, asyncio.run(failover())
    finally:
        cluster.stop()


def run_all(
    sizes: Sizes,
    broker_url: str | None = None,
    rate: int | None = None,
    only: set[str] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Result:
    if rate:
        sizes = Sizes(**{**sizes.__dict__, "rate": rate})
    result = Result()

    def want(name: str) -> bool:
        return only is None or name in only

    def with_broker(fn: Callable[[str], Coroutine[Any, Any, Any]], fast_loop: bool = True) -> Any:
        if broker_url is not None:
            return _run(fn(broker_url), fast_loop)
        broker = BrokerProc()
        broker.start()
        try:
            return _run(fn(broker.url), fast_loop)
        finally:
            broker.stop()

    for i in range(sizes.repeats):
        progress(f"run {i + 1}/{sizes.repeats}")
        if want("submit-batch"):
            result.add("submit-batch", with_broker(lambda u: submit_batch(u, sizes)))
        if want("submit-pipelined"):
            result.add("submit-pipelined", with_broker(lambda u: submit_pipelined(u, sizes)))
        if want("submit-latency"):
            p50, p99, p999 = with_broker(lambda u: submit_latency(u, sizes))
            result.add("submit-latency-p50", p50)
            result.add("submit-latency-p99", p99)
            result.add("submit-latency-p99.9", p999)
            p50, p99 = with_broker(lambda u: submit_latency_sync(u, sizes))
            result.add("submit-latency-sync-p50", p50)  # measured, no target set
            result.add("submit-latency-sync-p99", p99)
        if want("open-loop"):
            # the default loop: uvloop's timers have 1 ms granularity, too coarse to pace sends
            p50, p99, lag = with_broker(lambda u: open_loop(u, sizes), fast_loop=False)
            result.add("open-loop-p50", p50)
            result.add("open-loop-p99", p99)
            result.add("open-loop-send-lag-p99", lag)
        if want("end-to-end"):
            result.add("end-to-end", with_broker(lambda u: end_to_end(u, sizes)))
        if want("dispatch-latency"):
            p50, p99, s50, s99 = with_broker(lambda u: dispatch_latency(u, sizes))
            result.add("dispatch-latency-p50", p50)
            result.add("dispatch-latency-p99", p99)
            result.add("submit-to-start-p50", s50)
            result.add("submit-to-start-p99", s99)
        if broker_url is None:
            _own_brokers(sizes, want, result)
    if broker_url is None and want("export"):
        # One fill (a million tasks take ~30 s to put in), then `repeats` exports of it.
        progress(f"export: filling a broker with {sizes.export_tasks:,} finished tasks")
        fill_s, samples = export_1m(sizes)
        result.add("export-1m-fill", fill_s)
        for seconds in samples:
            result.add("export-1m", seconds)
    return result


def _own_brokers(sizes: Sizes, want: Callable[[str], bool], result: Result) -> None:
    """Scenarios that need brokers of their own (killed, filled to a million, clustered)."""
    if want("memory"):
        rss, _ = memory_and_recovery(sizes, sizes.memory_small, False)
        result.add("memory-100k", rss)
    if want("memory") or want("recovery"):
        rss, rec = memory_and_recovery(sizes, sizes.memory_large, True)
        result.add("memory-1m", rss)
        if rec is not None:
            result.add("recovery-1m", rec)
    if want("cluster"):
        submit_rate, e2e, failover_s = cluster_scenarios(sizes)
        result.add("cluster-submit-batch", submit_rate)
        result.add("cluster-end-to-end", e2e)
        result.add("cluster-failover", failover_s)


def verdict(name: str, median: float) -> str:
    target = TARGETS.get(name)
    if target is None:
        return ""
    op, value, _ = target
    if not op:
        return ""
    ok = median >= value if op == ">=" else median <= value
    return ("ok" if ok else "MISS") + f" ({op} {value:g})"
