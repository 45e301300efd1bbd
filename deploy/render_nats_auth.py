"""Write the in-cluster NATS server's users from shared/permissions.py.

Why: the NATS component must refuse exactly what the local stack refuses, so
its `authorization` block is made from the same table (`shared.permissions`)
instead of being written by hand, and tests/test_k8s_identities.py fails when
the files below no longer match it. Two files, both in k8s/components/nats/:

- `auth.conf`: `authorization { users = [...] }`, included by nats.conf. Each
  password is a variable (`$L2_GATEWAY_NATS_PASSWORD`), which nats-server
  expands from its environment when it loads the config;
- `auth-env.yaml`: a patch giving the nats container those variables, each from
  the identity's own Secret `tiermem-nats-<identity>` (key `password`), the
  same Secret the identity's pods read as NATS_USER / NATS_PASSWORD.

Add an identity for a worker of your own: add it to IDENTITIES with the role
whose permissions it gets (`"billing-bot": permissions.WORKER`), re-run, and
create its Secret (deploy/README.md, "Security"). Run after editing either:

    .venv/bin/python deploy/render_nats_auth.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import permissions  # noqa: E402

NATS = ROOT / "k8s" / "components" / "nats"
AUTH_CONF = NATS / "auth.conf"
AUTH_ENV = NATS / "auth-env.yaml"

#: identity (the NATS user name) -> the role in shared/permissions.py whose permissions it gets
IDENTITIES: dict[str, str] = {name: name for name in permissions.ROLES}

HEADER = ("# Made by deploy/render_nats_auth.py from shared/permissions.py: do not edit; re-run it\n"
          "# (tests/test_k8s_identities.py checks that this file is current).\n")
_VAR = re.compile(r'"\$([A-Z][A-Z0-9_]*)"')


def secret_name(identity: str) -> str:
    return f"tiermem-nats-{identity}"


def password_var(identity: str) -> str:
    """The environment variable of the nats container that holds this identity's password."""
    return identity.upper().replace("-", "_") + "_NATS_PASSWORD"


def users() -> list[dict]:
    """`shared.permissions.nats_users`, one entry per identity, passwords as `$VARIABLE`."""
    out = []
    for identity, role in IDENTITIES.items():
        entry, = permissions.nats_users({role: "$" + password_var(identity)})
        out.append(entry | {"user": identity})
    return out


def auth_conf() -> str:
    # The NATS config format reads JSON; only the variables must stay unquoted
    # (a quoted "$X" is a literal string).
    body = _VAR.sub(r"$\1", json.dumps({"users": users()}, indent=2))
    return HEADER + "# A client without one of these identities is refused.\nauthorization: " + body + "\n"


def auth_env() -> str:
    env = [{"name": password_var(i),
            "valueFrom": {"secretKeyRef": {"name": secret_name(i), "key": "password"}}}
           for i in IDENTITIES]
    patch = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "nats"},
             "spec": {"template": {"spec": {"containers": [{"name": "nats", "env": env}]}}}}
    return HEADER + yaml.safe_dump(patch, sort_keys=False)


def main() -> None:
    AUTH_CONF.write_text(auth_conf())
    AUTH_ENV.write_text(auth_env())
    print(f"wrote {AUTH_CONF.relative_to(ROOT)}, {AUTH_ENV.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
