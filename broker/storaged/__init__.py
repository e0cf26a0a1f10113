"""The storage process: one writer for the embedded SQLite files, shared by every worker of ``nhi-broker serve``.

- :mod:`broker.storaged.wire`: the frames between workers and the storage process;
- :mod:`broker.storaged.server`: its single-threaded loop (group commit across workers);
- :mod:`broker.storaged.handlers`: what it does with a batch (state operations, ledger appends, and an
  exchange's admission with its entry in one call);
- :mod:`broker.storaged.client`: a worker's channel to it (calls batched per event-loop turn);
- :mod:`broker.storaged.processes`: starting, restarting and stopping it from the supervisor.
"""
