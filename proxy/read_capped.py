"""Reading an answer's body up to a cap, for clients that keep only its first bytes (a webhook
receiver's reply, a domain challenge's answer).

``StreamReader.read(n)`` returns what has arrived so far, at most ``n`` bytes: one TCP segment
of a body sent in several writes. Reading until the cap or the end of the body is what every
caller means.
"""

from __future__ import annotations

import asyncio

import aiohttp


async def read_capped(
    stream: aiohttp.StreamReader, limit: int, *, within_s: float | None = None
) -> bytes:
    """The body's first ``limit`` bytes (all of it when shorter); the rest is never read. With
    ``within_s``, what arrived by then: a slow body is cut short, never an error."""
    raw = bytearray()
    try:
        async with asyncio.timeout(within_s):
            while len(raw) < limit:
                chunk = await stream.read(limit - len(raw))
                if not chunk:  # end of the body
                    break
                raw += chunk
    except TimeoutError:
        if within_s is None:
            raise
    return bytes(raw)
