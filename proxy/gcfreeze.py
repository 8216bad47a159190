"""Keep long-lived objects out of the cyclic collector's walks: freeze once, before they churn.

A full collection walks every tracked object the process holds, so with the identity caches
full (100,000 tenants and 200,000 key prefixes: about 4 tracked objects each) one took 400-950
ms on this machine, a pause for every request in flight. ``gc.freeze()`` (Python >= 3.7) moves
every object tracked so far into a permanent generation that collections never look at again.

That is only safe for objects that stay alive, or that refcounting alone frees (no cycles): a
frozen object in a reference cycle is never freed once it dies. Whatever is alive at a freeze
is frozen, requests in flight included (tasks, coroutines, protocols, transports: cycles), so
the process freezes at two moments only, never while serving in steady state: at start-up
(``app.freeze_startup_objects``) and once when the first name preload has filled the caches
(``stores.identity``). Entries stored later (loads, refreshes, negative entries, the preload
after a reconnection) stay tracked and are collected as usual. A frozen cache entry that is
evicted or replaced later is still freed by its reference count (entries hold no cycles).
What a freeze catches in flight is one moment's worth, twice per process (and ``/readyz``
answers 503 until the preload is done, so little traffic is in flight then): it does not grow
with traffic.

Collecting first means no garbage cycle is ever frozen.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    gc.collect()
    gc.freeze()
