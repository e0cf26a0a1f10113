"""Keep the cycle collector off what start-up built, so a serving process never pauses for it.

A worker builds about 100,000 long-lived container objects while it starts (the policy set, the
registry, Casbin's model, the app and its routes). CPython's full (generation 2) collection walks all
of them: in a broker under load that was a pause of ~70 ms, twice per 8,000 exchanges, felt by every
request in flight (``scripts/profile_exchange.py`` with a ``gc.callbacks`` probe). :func:`settle`
moves them into the permanent generation once start-up is done (:func:`gc.freeze`): later full
collections walk only what the process allocated since.

Frozen objects are never collected, which is right for objects that live as long as the process. When
such an object is replaced (a live policy reload swaps the set), :func:`release` unfreezes everything,
so the next full collection that the interpreter runs by itself reclaims the old set's cycles, and
freezes the survivors again right after that collection.
"""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["release", "settle", "thaw"]

#: Set by :func:`release`; the collector's callback freezes again after the next full collection. A
#: plain flag, not a lock: a collection may start in any thread at any allocation, inside this module too.
_refreeze_pending = False


def settle() -> int:
    """Collect once, then freeze what survives (call when start-up is done); the number frozen."""
    if _refreeze_after_full_collection not in gc.callbacks:
        gc.callbacks.append(_refreeze_after_full_collection)
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def release() -> None:
    """Unfreeze after long-lived objects were replaced; they are frozen again after the next full collection.

    Does nothing when nothing is frozen (a process that never called :func:`settle`).
    """
    global _refreeze_pending
    if gc.get_freeze_count() == 0:
        return
    _refreeze_pending = True
    gc.unfreeze()


def thaw() -> None:
    """Unfreeze everything for good (no freeze after the next collection): a process that stops serving."""
    global _refreeze_pending
    _refreeze_pending = False
    gc.unfreeze()


def _refreeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    """``gc.callbacks`` hook: once a generation-2 collection finished after :func:`release`, freeze again."""
    global _refreeze_pending
    if _refreeze_pending and phase == "stop" and info.get("generation") == 2:
        _refreeze_pending = False
        gc.freeze()
