"""A stand-in agentbus service for the replica supervisor's tests: /readyz on AGENTBUS_HTTP_PORT.

Run as ``python -m fake_service`` (tests put this folder on PYTHONPATH). It becomes ready
after ``FAKE_READY_DELAY_S`` seconds, exits at once with ``FAKE_CRASH=1``, and stops
on SIGTERM (after ``FAKE_STOP_DELAY_S``, to imitate finishing in-flight work).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from aiohttp import web


async def serve() -> int:
    if os.environ.get("FAKE_CRASH") == "1":
        print("fake service: crashing on purpose", file=sys.stderr, flush=True)
        return 3
    port = int(os.environ["AGENTBUS_HTTP_PORT"])
    ready_after = asyncio.get_running_loop().time() + float(os.environ.get("FAKE_READY_DELAY_S", "0"))

    async def readyz(_: web.Request) -> web.Response:
        ready = asyncio.get_running_loop().time() >= ready_after
        return web.json_response({"ready": ready, "pid": os.getpid()}, status=200 if ready else 503)

    app = web.Application()
    app.add_routes([web.get("/readyz", readyz), web.get("/healthz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"fake service: pid {os.getpid()} serving on {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.sleep(float(os.environ.get("FAKE_STOP_DELAY_S", "0")))
    await runner.cleanup()
    print("fake service: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(serve()))
