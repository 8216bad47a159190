"""When a custom-domain challenge is checked next (CONTRACT §12).

At once after ``domains add``, then 60 s after the first check, 90 s after the second, and so
on: 60 s x 1.5^(n-1) after the n-th check, never more than 3,600 s apart. A DNS change takes
minutes to propagate (the TTLs of RFC 1035 §3.2.1), so early checks are frequent and later ones
back off; the cap keeps a domain fixed a day later from waiting more than an hour. Let's
Encrypt's ACME clients poll a pending authorization in the same spirit (RFC 8555 §7.5.1).
"""

from __future__ import annotations

from datetime import datetime, timedelta

FIRST_DELAY_S = 60.0
GROWTH = 1.5
MAX_DELAY_S = 3600.0
# 60 x 1.5^11 > 3,600 already: a larger exponent only risks a float overflow.
_MAX_EXPONENT = 32


def delay_after(checks: int) -> float:
    """Seconds from the ``checks``-th check to the next one; 0 before the first (at once)."""
    if checks <= 0:
        return 0.0
    return min(FIRST_DELAY_S * GROWTH ** min(checks - 1, _MAX_EXPONENT), MAX_DELAY_S)


def next_check_at(checked_at: datetime, checks: int) -> datetime:
    """When the row is due again after its ``checks``-th check, made at ``checked_at``."""
    return checked_at + timedelta(seconds=delay_after(checks))
