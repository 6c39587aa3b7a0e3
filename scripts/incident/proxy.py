#!/usr/bin/env python3
"""A delaying TCP proxy on loopback for the slow-replica scenario.
Usage: proxy.py TARGET_PORT TRIGGER_FILE MIN_MS MAX_MS
Listens on 127.0.0.1 (a free port, printed as "PROXY PORT n") and forwards to 127.0.0.1:TARGET_PORT.
While TRIGGER_FILE exists, each chunk read in either direction is delivered MIN..MAX ms later (random),
never before the chunk read before it (byte order kept)."""
import asyncio
import os
import random
import sys

target, trigger, lo, hi = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])


async def pump(reader, writer):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    last = 0.0

    async def deliver():
        while True:
            at, data = await queue.get()
            if data is None:
                break
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            delay = random.uniform(lo, hi) / 1000 if os.path.exists(trigger) else 0.0
            last = max(last, loop.time() + delay)
            await queue.put((last, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0.0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def handle(client_reader, client_writer):
    try:
        server_reader, server_writer = await asyncio.open_connection('127.0.0.1', target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))


async def main():
    server = await asyncio.start_server(handle, '127.0.0.1', 0)
    print(f'PROXY PORT {server.sockets[0].getsockname()[1]}', flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
