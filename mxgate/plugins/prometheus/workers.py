"""The receive workers' processes (``server.receive_workers``): their CPU, memory and descriptors, read from /proc
at scrape time. Their events need no aggregation here: a worker's hooks report through the main process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mxgate import RECEIVE_WORKER_PIDS

if TYPE_CHECKING:
    from mxgate.plugins.prometheus.plugin import PrometheusPlugin


class WorkerProcessCollector(Collector):
    """CPU, memory and descriptors of each receive worker (``mxgate_process_*`` describe the main process only),
    read from /proc at scrape time (Linux, as prometheus-client's process collector)."""

    def __init__(self, plugin: PrometheusPlugin) -> None:
        self.plugin = plugin

    def collect(self) -> Iterator[Metric]:
        labels = ["slot"]
        cpu = CounterMetricFamily(
            "mxgate_receive_worker_cpu_seconds",
            "CPU time of each receive worker (user and system); starts again from 0 when a worker is restarted.",
            labels=labels,
        )
        rss = GaugeMetricFamily(
            "mxgate_receive_worker_resident_memory_bytes", "Resident memory of each receive worker.", labels=labels
        )
        fds = GaugeMetricFamily(
            "mxgate_receive_worker_open_fds", "Open descriptors of each receive worker.", labels=labels
        )
        runtime = self.plugin.runtime
        pids = runtime.stash.get(RECEIVE_WORKER_PIDS, {}) if runtime is not None else {}
        for slot, pid in sorted(pids.items()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # it exited between the list and the read
            cpu.add_metric([str(slot)], (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS)
            rss.add_metric([str(slot)], pages * _PAGE_SIZE)
            fds.add_metric([str(slot)], open_fds)
        yield cpu
        yield rss
        yield fds


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
