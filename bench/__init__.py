"""`python -m bench`: tiermem's latency and throughput against bare baselines.

Every figure is measured next to the raw building block it is built from
(bare NATS request/reply to another process, bare Redis LRANGE, bare
Postgres indexed lookup, bare JetStream publish) in the same run, on the
same servers, and reported as a ratio to it. Results go to
`bench/results/memory.{md,json,png}`.
"""
