"""The layout shows the architecture: services talk over the bus, never by import.

A service that imports another couples their deploys and hides a dependency
the subjects should show; what two services both need lives in `shared/`.
Imports are read with `ast` (no module is executed), relative ones resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = sorted(p.name for p in (REPO / "services").iterdir()
                  if p.is_dir() and (p / "__init__.py").exists())


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every module `path` imports, absolute, `from a import b` also as `a.b` (b may be a module)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "services" else None


def test_the_checker_sees_every_form_of_import(tmp_path):
    """Absolute, `from services import x`, relative (`..other`) and function-level imports."""
    module = tmp_path / "services" / "a" / "sub" / "m.py"
    module.parent.mkdir(parents=True)
    module.write_text("import services.b.x\nfrom services import c\nfrom ...d import y\n"
                      "from . import own\nfrom ..a2 import z\n"
                      "def f():\n    from services.e.q import w\n")
    found = {service_of(m) for m in imported_modules(module, tmp_path)} - {None}
    assert found == {"a", "b", "c", "d", "e"}
    assert "services.a.sub.own" in imported_modules(module, tmp_path)


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another(service):
    offenders = []
    for path in sorted((REPO / "services" / service).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            other = service_of(module)
            if other is not None and other != service:
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offenders, "services talk over the bus; move what both need to shared/:\n" + \
        "\n".join(offenders)


def test_shared_imports_no_service():
    offenders = [f"{path.relative_to(REPO)} imports {module}"
                 for path in sorted((REPO / "shared").rglob("*.py"))
                 for module in sorted(imported_modules(path))
                 if module == "services" or service_of(module) is not None]
    assert not offenders, "shared/ is the runtime library under every service:\n" + "\n".join(offenders)


def test_the_image_carries_every_package_the_services_import():
    """The image copies only what it names (deploy/Dockerfile, .dockerignore): a repo package a
    service imports (the agent worker uses the `tiermem` client) must be among them."""
    own = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    needed = {m.split(".")[0] for path in (REPO / "services").rglob("*.py") for m in imported_modules(path)} & own
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    allowed = {line[1:].strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert "tiermem" in needed
    for package in needed:
        assert f"COPY {package} ./{package}" in dockerfile and package in allowed, package


def struct_classes(path: Path) -> list[str]:
    """Names of the msgspec Structs `path` defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(ast.unparse(base) in ("msgspec.Struct", "Struct") for base in node.bases)]


def test_request_and_reply_types_live_in_the_contract():
    """A body that crosses the bus is a `...Request`/`...Reply` in shared/contract.py, never a
    copy beside its handler or its bench. Private `_...Reply` types decode NATS's own
    JetStream API replies (shared/stream.py), which are not tiermem's contract."""
    offenders = [f"{path.relative_to(REPO)}: {name}"
                 for folder in ("services", "shared", "bench", "demo", "chaos")
                 for path in sorted((REPO / folder).rglob("*.py"))
                 if path != REPO / "shared" / "contract.py"
                 for name in struct_classes(path)
                 if name.endswith(("Request", "Reply")) and not name.startswith("_")]
    assert not offenders, "wire types belong in shared/contract.py:\n" + "\n".join(offenders)
    assert {"L2Reply", "LLMStatsReply", "ForgetStatus", "ForgetJob"} <= set(
        struct_classes(REPO / "shared" / "contract.py"))


def test_one_copy_of_each_statistic():
    """Percentiles come from bench/stats.py (numpy.percentile), Wilson intervals from
    shared/wilson.py: two copies drift apart and two reports stop agreeing on "p95"."""
    home = {"percentile": REPO / "bench" / "stats.py", "wilson": REPO / "shared" / "wilson.py"}
    offenders = []
    for folder in ("services", "shared", "bench", "chaos"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for stat, allowed in home.items():
                        if stat in node.name.lower() and path != allowed:
                            offenders.append(f"{path.relative_to(REPO)}: {node.name}")
    assert not offenders, "use bench.stats.percentile / shared.wilson:\n" + "\n".join(offenders)


def nested_functions_in_build(source: str) -> list[str]:
    """Functions defined inside a module-level `build`: handlers that cannot be imported
    or unit-tested on their own."""
    nested = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "build":
            nested += [n.name for n in ast.walk(node)
                       if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n is not node]
    return nested


def test_the_build_checker_sees_a_handler_closure():
    assert nested_functions_in_build(
        "async def build(rt):\n    async def get(req):\n        return req\n") == ["get"]
    assert nested_functions_in_build("async def build(rt):\n    rt.endpoint('g', 's', T, tier.get)\n") == []


@pytest.mark.parametrize("service", SERVICES)
def test_handlers_are_methods_not_closures_in_build(service):
    path = REPO / "services" / service / "service.py"
    if not path.exists():
        pytest.skip(f"{service} has no service.py")
    assert nested_functions_in_build(path.read_text()) == [], \
        f"services/{service}/service.py: move these into the service's class"
