"""The one place a service's Redis client is made: a plain client, or a cluster client.

`REDIS_CLUSTER=1` says `REDIS_URL` names one node of a Redis Cluster; redis-py's
`RedisCluster` then learns the slot map from it and sends each command to the
node owning its key's slot. A setting rather than a URL scheme: the URL stays
one that `redis-cli`, the probes and operators' tools take as it is.

What the services send is valid on a cluster because every multi-key script
or transaction touches one hash tag's keys only (a user's `{u}`, or the L2
state's `{g}`); pipelines may span slots (redis-py splits them per node, and
runs the nodes' parts in parallel: code that needs an order across slots waits
for one part before sending the next, see `services/l2_gateway/redis_window.py`).
"""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster

from shared.settings import Settings


def connect(settings: Settings, **options) -> Redis | RedisCluster:
    """A client for `settings.redis_url` with the ACL user of `redis_auth()`; `options` go to
    the client (timeouts, health checks)."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **settings.redis_auth(), **options)
    return Redis.from_url(settings.redis_url, **settings.redis_auth(), **options)
