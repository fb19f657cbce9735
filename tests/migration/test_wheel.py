"""The built wheel ships its migrations: installed into a fresh virtualenv, it migrates and works.

The wheel is built once per module and installed into a new virtualenv without system site
packages (its dependencies come from the package index). Everything that imports the package
runs with ``python -I`` from a temporary directory, so the source checkout cannot be imported.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt.config import ENV_DATABASE_URL
from executus_ckpt.migrate import current_revision
from executus_ckpt.schema import REQUIRED_REVISION

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(
    cmd: list[str], *, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


async def _revision(url: str) -> str | None:
    engine = create_async_engine(url)
    try:
        return await current_revision(engine)
    finally:
        await engine.dispose()


def _clean_env() -> dict[str, str]:
    """The environment minus anything that could point Python at the checkout or a database."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", ENV_DATABASE_URL}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir)],
        cwd=REPO_ROOT,
    )
    (built,) = outdir.glob("executus_ckpt-*.whl")
    return built


_PURELIB = "import sysconfig; print(sysconfig.get_path('purelib'))"


class Venv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.bin = root / "bin"

    def site_packages(self) -> Path:
        out = _run(
            [str(self.python), "-I", "-c", _PURELIB],
            cwd=self.root,
            env=_clean_env(),
        )
        return Path(out.stdout.strip()).resolve()


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    root = tmp_path_factory.mktemp("wheelvenv") / "venv"
    cwd = root.parent
    _run([sys.executable, "-m", "venv", str(root)], cwd=cwd, env=_clean_env())
    env = Venv(root)
    _run(
        [
            str(env.python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            str(wheel),
        ],
        cwd=cwd,
        env=_clean_env(),
    )
    yield env


def test_wheel_contains_migrations_and_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "executus_ckpt/_migrations/env.py" in names
    assert "executus_ckpt/_migrations/versions/0001_run_checkpoints.py" in names
    assert "executus_ckpt/_migrations/script.py.mako" in names
    for version in (REPO_ROOT / "migrations" / "versions").glob("*.py"):
        assert f"executus_ckpt/_migrations/versions/{version.name}" in names, version.name
    assert "executus_ckpt/py.typed" in names
    assert "executus_ckpt/schema.py" in names
    assert "executus_ckpt/migrate.py" in names
    # No stray top-level packages (tests, a bare `migrations`) and no bytecode.
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"executus_ckpt"}
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]


def test_wheel_console_scripts_point_at_packaged_modules(wheel: Path) -> None:
    """Every console script the wheel installs must import: its module must be in the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (ep_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(ep_name).decode())
    scripts = dict(parser["console_scripts"])
    assert "executus-ckpt" in scripts
    for script, target in scripts.items():
        module = target.split(":", 1)[0]
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, (
            f"console script {script!r} -> {target!r}, but the wheel has no module {module!r}"
        )


_ROUND_TRIP = textwrap.dedent(
    """
    import asyncio, json, sys
    import executus_ckpt
    from executus_ckpt import RunCheckpoint, RunCheckpointMeta, SQLCheckpointStore, migrate
    from executus_ckpt.migrate import current_revision, script_location

    async def main(url):
        await migrate(url)
        async with SQLCheckpointStore.open(url) as store:
            await store.save(
                RunCheckpoint(RunCheckpointMeta("w1"), messages=[{"role": "user"}], iteration=4)
            )
            loaded = await store.load("w1")
            revision = await current_revision(store.engine)
        print(json.dumps({
            "package": executus_ckpt.__file__,
            "script_location": script_location(),
            "revision": revision,
            "messages": list(loaded.messages),
            "iteration": loaded.iteration,
        }))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_installed_wheel_migrates_and_round_trips(venv: Venv, tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    url = f"sqlite+aiosqlite:///{db}"
    proc = _run([str(venv.python), "-I", "-c", _ROUND_TRIP, url], cwd=tmp_path, env=_clean_env())
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    site = venv.site_packages()

    package = Path(out["package"]).resolve()
    assert package.is_relative_to(site), f"imported {package}, not the installed wheel"
    assert not package.is_relative_to(REPO_ROOT)

    location = Path(out["script_location"]).resolve()
    assert location == site / "executus_ckpt" / "_migrations", location
    assert (location / "versions" / "0001_run_checkpoints.py").is_file()

    assert out["revision"] == REQUIRED_REVISION
    assert out["messages"] == [{"role": "user"}]
    assert out["iteration"] == 4

    # Seen from outside the venv too: the file is at the revision this checkout requires.
    assert asyncio.run(_revision(url)) == REQUIRED_REVISION


_LOCATE_AND_MIGRATE = textwrap.dedent(
    """
    import asyncio, sys
    from executus_ckpt import migrate
    from executus_ckpt.migrate import script_location

    print(script_location(), flush=True)
    asyncio.run(migrate(sys.argv[1]))
    """
)


def test_installed_wheel_ignores_a_foreign_migrations_dir(venv: Venv, tmp_path: Path) -> None:
    """Another distribution's top-level ``migrations/`` in site-packages is not ours to run."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'f.db'}"
    site = venv.site_packages()
    foreign = site / "migrations"
    assert not foreign.exists()
    foreign.mkdir()
    try:
        (foreign / "env.py").write_text("raise SystemExit('foreign migrations ran')\n")
        proc = subprocess.run(
            [str(venv.python), "-I", "-c", _LOCATE_AND_MIGRATE, url],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(foreign)
    location = Path(proc.stdout.strip().splitlines()[0]).resolve()
    assert location == site / "executus_ckpt" / "_migrations", (
        f"script_location() picked {location}, a directory that is not executus_ckpt's"
    )
    assert proc.returncode == 0, proc.stderr
    assert asyncio.run(_revision(url)) == REQUIRED_REVISION


def test_installed_console_script_migrates(venv: Venv, tmp_path: Path) -> None:
    """``executus-ckpt --url ... migrate``, the command SchemaOutOfDateError tells users to run."""
    db = tmp_path / "cli.db"
    url = f"sqlite+aiosqlite:///{db}"
    script = venv.bin / "executus-ckpt"
    assert script.is_file()
    _run([str(script), "migrate", "--url", url], cwd=tmp_path, env=_clean_env(), timeout=120)
    assert asyncio.run(_revision(url)) == REQUIRED_REVISION


def test_wheel_metadata_has_one_version_and_no_dev_extras(wheel: Path) -> None:
    """The version comes from ``executus_ckpt.__version__``; dev tooling is not an extra."""
    import executus_ckpt

    archive = zipfile.ZipFile(wheel)
    (meta_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    meta = archive.read(meta_name).decode()
    headers = [line for line in meta.splitlines() if ": " in line and not line.startswith(" ")]
    assert f"Version: {executus_ckpt.__version__}" in headers
    assert wheel.name.startswith(f"executus_ckpt-{executus_ckpt.__version__}-")
    extras = sorted(h.removeprefix("Provides-Extra: ") for h in headers if "Provides-Extra" in h)
    assert extras == ["openai-agents", "otel", "postgres", "pydantic-ai"]  # no dev tooling
    requires = [h for h in headers if h.startswith("Requires-Dist: ")]
    assert any("pydantic-ai-slim" in h and "extra == 'pydantic-ai'" in h for h in requires)
    assert not any(h.startswith("Requires-Dist: pydantic-ai ") for h in requires)  # slim only
    assert any("opentelemetry-api" in h and "extra == 'otel'" in h for h in requires)
    assert not any("opentelemetry-sdk" in h for h in requires)  # the API only
    assert "Classifier: Typing :: Typed" in headers
    assert "Classifier: Framework :: AsyncIO" in headers
    assert any(h.startswith("Project-URL: Repository, https://") for h in headers)
