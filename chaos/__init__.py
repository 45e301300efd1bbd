"""The fault suite (`just chaos`): faults injected one at a time under load, judged against a truth log.

`python -m chaos --help`; results in `bench/results/chaos.md`. Modules:
`truth` (the client's record and the pure checks), `workload` (the load),
`faults` (inject / heal pairs), `harness` (servers and services we can kill
and restart), `runner` (one trial), `report` (table and plot).
"""
