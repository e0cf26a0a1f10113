"""SIGHUP reloads the policy directory in a running worker, without a restart.

The handler runs on the worker's event loop; the reload itself is :meth:`Runtime.reload_policies`
(lint, swap, one ``policy_load`` entry; other workers follow through the shared state store). A
refused set is logged with every problem (file, line, what is wrong) and the old set keeps serving.
With several workers the supervisor process receives the signal and hands it to one worker
(:mod:`broker.api.server`), never restarting them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from broker.errors import BrokerError, PolicyLoadError
from broker.runtime import Runtime

__all__ = ["install_sighup", "reload_on_signal"]

log = logging.getLogger("nhi_broker.reload")


async def reload_on_signal(runtime: Runtime) -> None:
    """Reload the policies as SIGHUP asks; log the outcome (there is nobody to answer)."""
    try:
        outcome = await runtime.reload_policies("sighup")
    except PolicyLoadError as exc:
        log.error("SIGHUP: policy reload refused, still serving %s:\n  %s",
                  runtime.policies.version, "\n  ".join(exc.problems))
        return
    except BrokerError as exc:
        log.error("SIGHUP: policy reload failed (%s), still serving %s", exc.description, runtime.policies.version)
        return
    if outcome.recorded:
        log.info("SIGHUP: policy set %s is live (was %s), recorded at ledger index %d",
                    outcome.version, outcome.previous_version, outcome.record.ledger_index)
    else:
        log.info("SIGHUP: policy set %s was already live and recorded (ledger index %d)",
                    outcome.version, outcome.record.ledger_index)


def install_sighup(runtime: Runtime) -> Callable[[], None]:
    """Make SIGHUP reload the policies on the running loop; returns the function that undoes it.

    Outside the main thread (an app served by a test harness) no signal can be handled: nothing is
    installed and the returned function does nothing.
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload_on_signal(runtime))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (RuntimeError, ValueError, NotImplementedError):
        return lambda: None

    def remove() -> None:
        try:
            loop.remove_signal_handler(signal.SIGHUP)
        except (RuntimeError, ValueError):
            pass
    return remove
