"""The local stack: real NATS, Redis and Postgres from PyPI packages, and every service as a process.

Dev-box, test and benchmark tooling, not part of the runtime: it is not in
the installed package list (pyproject.toml) nor in the service image
(deploy/Dockerfile); nothing under `services/` or `shared/` imports it.

    python -m devstack up|down|status     (`just up` / `just down` / `just status`)

- `devstack.servers`: the server table and the helpers to start, probe and stop processes;
  one module per server (`nats`, `redis`, `postgres`, `simulator`) over `devstack.process`;
  `start_redis_cluster` starts a 3-master Redis Cluster (tests, `bench --only scale`).
- `devstack.stack`: `up` / `down` / `status` of servers and services, state in `stack.json`.
- `devstack.supervise`: restarts a service that dies, as Kubernetes would.

The state folder and its `stack.env` are read by `shared.settings` (`state_dir`,
`load_stack_env`): a service started by hand finds the stack through them.
"""
