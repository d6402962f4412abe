#!/usr/bin/env python3
"""Drive the daemon's control socket with the qemu.qmp package's async client (PyPI
`qemu.qmp`), as people drive qemu-storage-daemon: connect (greeting and capabilities
negotiation are the library's), query-status, query-stats, an error reply, events, quit.

Usage: qmp_client.py CONTROL_SOCKET. Exit 0 when everything matched; any failure raises.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(path: str) -> None:
    qmp = QMPClient("control-test")
    await qmp.connect(path)
    assert qmp.greeting is not None
    print("greeting:", qmp.greeting)

    status = await qmp.execute("query-status")
    print("query-status:", status)
    assert status["status"] == "running", status
    assert status["running"] is True, status

    stats = await qmp.execute("query-stats")
    print("query-stats:", stats)
    # Only queues a frontend started are listed; no VMM has connected.
    assert stats["queues"] == [], stats
    for key in ("requests", "bytes-read", "bytes-written", "errors", "latency-histogram"):
        assert key in stats["total"], (key, stats)
    assert "l2-cache-hits" in stats["engine"], stats

    image = await qmp.execute("query-image")
    assert image["format"] == "qcow2", image

    dedup = await qmp.execute("query-dedup")
    assert dedup["mode"] == "off" and dedup["running"] is False, dedup

    try:
        await qmp.execute("dedup-set-mode", {"mode": "inline"})
        raise AssertionError("dedup-set-mode succeeded without dedup")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e.error_class
        print("dedup-set-mode error:", e.error_class, e)

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("an unknown command succeeded")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e.error_class

    # qmp.events is the client's default listener: it gets every event.
    ret = await qmp.execute("quit")
    assert ret == {}, ret
    event = await asyncio.wait_for(qmp.events.get(), timeout=20)
    print("event:", event)
    assert event["event"] == "SHUTDOWN", event
    assert event["data"]["reason"] == "host-qmp-quit", event
    try:
        await qmp.disconnect()
    except EOFError:
        # The server hung up after quit before we did: expected, and handled the same way by
        # QEMU's own python/qemu/machine (EOF after a successful quit is not an error).
        pass
    print("OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: qmp_client.py CONTROL_SOCKET")
    asyncio.run(main(sys.argv[1]))
