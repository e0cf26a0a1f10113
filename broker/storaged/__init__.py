"""Storage processes: one writer per embedded SQLite file, shared by every worker of ``nhi-broker serve``.

- :mod:`broker.storaged.wire`: the frames between workers and a storage process;
- :mod:`broker.storaged.server`: the storage process's single-threaded loop (group commit across workers);
- :mod:`broker.storaged.handlers`: what it does with a batch (state operations, ledger appends);
- :mod:`broker.storaged.client`: a worker's channel to it (calls batched per event-loop turn);
- :mod:`broker.storaged.processes`: starting, restarting and stopping them from the supervisor.
"""
