"""Start, check and stop one local Ray head node without touching any other Ray instance on the host.

Run through ``cluster/local-head.sh`` (which activates the project's venv first, so that job entrypoints find
``python`` and ``defectflow``)::

    cluster/local-head.sh [start] [--num-cpus N] [--port P] [--dashboard-port P] ... [--temp-dir DIR] [-- RAY_ARGS]
    cluster/local-head.sh status [--temp-dir DIR]
    cluster/local-head.sh stop [--temp-dir DIR]

Why not plain ``ray start`` / ``ray stop``:

- ``ray start`` reports success even when a port it needs is taken: with the dashboard agent's port (52365) in use,
  every ``ray job submit`` then fails with "500: No available agent" and the cause is only in
  ``dashboard_agent.log``. So ports are checked before the start (defaults are Ray's when free, a free port
  otherwise), and after it a test job must run through the Jobs API.
- ``ray stop`` stops every Ray instance of the user on the host (other engineers' sessions, test suites). The head
  is started in a new session (``setsid``), which every Ray process it spawns inherits; ``stop`` terminates exactly
  that session's processes and their descendants (job drivers run in sessions of their own).

The state of a head (addresses, auth mode, session id) is written to ``<temp-dir>/defectflow-head.env``, in shell
syntax: ``cluster/submit.sh`` reads it to find the head when RAY_ADDRESS is not set.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TEMP_DIR = "/tmp/defectflow-head"
STATE_FILE = "defectflow-head.env"
# Ray puts Unix sockets at <temp-dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store; AF_UNIX paths are
# limited to 107 bytes.
MAX_TEMP_DIR_LEN = 107 - len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")

# (option, ray start flag, Ray's default port or None when Ray picks one itself, what it is)
PORTS = [
    ("port", "--port", 6379, "GCS"),
    ("dashboard_port", "--dashboard-port", 8265, "dashboard and Jobs API"),
    ("dashboard_agent_listen_port", "--dashboard-agent-listen-port", 52365, "dashboard agent (HTTP)"),
    ("dashboard_agent_grpc_port", "--dashboard-agent-grpc-port", None, "dashboard agent (gRPC)"),
    ("runtime_env_agent_port", "--runtime-env-agent-port", None, "runtime env agent"),
    ("ray_client_server_port", "--ray-client-server-port", 10001, "Ray client server"),
    ("metrics_export_port", "--metrics-export-port", None, "metrics export"),
]


class HeadError(Exception):
    """A failure the user can act on: printed as an `error:` line (and a `hint:`), exit status 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


# ------------------------------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def choose_ports(args: argparse.Namespace) -> dict[str, int | None]:
    """Every port the head needs: an explicit number must be free; 'auto' takes a free one; unset takes Ray's
    default when it is free and a free one otherwise (ports Ray picks itself stay unset unless asked for)."""
    held: list[socket.socket] = []  # keep auto-picked ports bound until all are chosen, so none repeats

    def pick() -> int:
        s = socket.socket()
        s.bind(("0.0.0.0", 0))
        held.append(s)
        return s.getsockname()[1]

    chosen: dict[str, int | None] = {}
    try:
        for name, flag, default, what in PORTS:
            value = getattr(args, name)
            if value is None and default is None:
                chosen[name] = None
            elif value == "auto":
                chosen[name] = pick()
            elif value is None:
                if port_free(default) and default not in chosen.values():
                    chosen[name] = default
                else:
                    chosen[name] = pick()
                    print(f"port {default} ({what}) is in use: using {chosen[name]} (set it with {flag})",
                          file=sys.stderr)
            else:
                try:
                    port = int(value)
                except ValueError:
                    raise HeadError(f"{flag} {value!r}: give a port number or 'auto'") from None
                if not port_free(port):
                    raise HeadError(f"port {port} ({what}, {flag}) is in use (another Ray instance?)",
                                    f"pass another port, or {flag} auto for a free one") from None
                chosen[name] = port
    finally:
        for s in held:
            s.close()
    return chosen


# ------------------------------------------------------------------------------------------------- state


def state_path(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE_FILE


def read_state(temp_dir: str) -> dict[str, str] | None:
    p = state_path(temp_dir)
    if not p.is_file():
        return None
    out: dict[str, str] = {}
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def write_state(temp_dir: str, values: dict[str, str]) -> None:
    p = state_path(temp_dir)
    lines = ["# written by cluster/local-head.sh; parsed (not sourced) by cluster/submit.sh"]
    lines += [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    tmp = p.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o600)  # submit.sh trusts this file only when its user owns it
    tmp.replace(p)


def session_processes(sid: int) -> list:
    """The processes of the head's session and all their descendants (job drivers start sessions of their own)."""
    import psutil

    roots = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.pid != os.getpid():
                roots.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def head_alive(state: dict[str, str]) -> bool:
    """Whether the recorded head still runs: its GCS process is alive and still in the recorded session."""
    try:
        pid, sid = int(state["GCS_PID"]), int(state["SESSION_ID"])
        return os.getsid(pid) == sid
    except (KeyError, ValueError, ProcessLookupError, PermissionError):
        return False


# ------------------------------------------------------------------------------------------------- auth


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def auth_mode(requested: str | None) -> str:
    """The head's auth mode: --auth, else RAY_AUTH_MODE, else what `ray start` would do (token when one exists)."""
    mode = (requested or os.environ.get("RAY_AUTH_MODE") or ("token" if token_available() else "disabled")).lower()
    if mode not in ("token", "disabled"):
        raise HeadError(f"auth mode {mode!r}: use token or disabled")
    if mode == "token" and not token_available():
        raise HeadError("token authentication asked for but no token exists",
                        "create one with `ray get-auth-token --generate` (writes ~/.ray/auth_token) or set "
                        "RAY_AUTH_TOKEN; or use --auth disabled on a trusted host")
    return mode


# ------------------------------------------------------------------------------------------------- start


def start(args: argparse.Namespace) -> int:
    temp_dir = args.temp_dir
    if len(temp_dir) > MAX_TEMP_DIR_LEN:
        raise HeadError(f"--temp-dir {temp_dir} is too long for Ray's Unix socket paths "
                        f"(at most {MAX_TEMP_DIR_LEN} characters)")
    old = read_state(temp_dir)
    if old is not None:
        if head_alive(old):
            raise HeadError(f"a head started by local-head.sh already runs with temp dir {temp_dir} "
                            f"(Jobs API {old.get('RAY_ADDRESS')}): stop it with `cluster/local-head.sh stop "
                            f"--temp-dir {temp_dir}`, or pass another --temp-dir")
        state_path(temp_dir).unlink()
    os.makedirs(temp_dir, exist_ok=True)
    ports = choose_ports(args)
    mode = auth_mode(args.auth)
    num_cpus = args.num_cpus if args.num_cpus is not None else os.cpu_count() or 1
    cmd = [os.environ.get("RAY", "ray"), "start", "--head", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", f"--dashboard-host={args.dashboard_host}", "--include-dashboard=true",
           "--disable-usage-stats"]
    for name, flag, _default, _what in PORTS:
        if ports[name] is not None:
            cmd.append(f"{flag}={ports[name]}")
    if args.object_store_memory:
        cmd.append(f"--object-store-memory={args.object_store_memory}")
    cmd += args.ray_args
    env = {**os.environ, "RAY_AUTH_MODE": mode, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a head never joins anything
    log_path = Path(temp_dir) / "ray-start.log"
    print(f"starting a Ray head: {shlex.join(cmd)}", file=sys.stderr)
    with open(log_path, "w") as log:
        # A new session: every process Ray spawns for this head inherits its id, which is how `stop` finds them.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        rc = proc.wait()
    sid = proc.pid
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        stop_session(sid)
        raise HeadError(f"`ray start` failed (exit {rc}); its output ({log_path}) ends with:\n{tail}")
    session_dir = os.path.realpath(os.path.join(temp_dir, "session_latest"))
    gcs_address = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
    gcs_pid = _gcs_pid(sid)
    dashboard = f"http://{_client_host(args.dashboard_host)}:{ports['dashboard_port']}"
    state = {
        "RAY_ADDRESS": dashboard,
        "RAY_AUTH_MODE": mode,
        "RAY_GCS_ADDRESS": gcs_address,
        "RAY_CLIENT_ADDRESS": f"ray://127.0.0.1:{ports['ray_client_server_port']}",
        "SESSION_DIR": session_dir,
        "SESSION_ID": str(sid),
        "GCS_PID": str(gcs_pid or ""),
        "TEMP_DIR": temp_dir,
    }
    write_state(temp_dir, state)
    if not args.no_verify:
        problem = verify_jobs_api(dashboard, mode, timeout_s=args.verify_timeout)
        if problem:
            n = stop_session(sid)
            state_path(temp_dir).unlink(missing_ok=True)
            logs = os.path.join(session_dir, "logs")
            raise HeadError(
                f"the head started but its Jobs API at {dashboard} did not run a test job: {problem}\n"
                f"  the head was stopped ({n} processes); its logs stay in {logs}: see dashboard_agent.log "
                f"(the job agent; its port {ports['dashboard_agent_listen_port']} is "
                f"--dashboard-agent-listen-port), dashboard.log and the job_driver_*.log files")
    print(summary(state, temp_dir))
    return 0


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _gcs_pid(sid: int) -> int | None:
    return next((p.pid for p in session_processes(sid) if _name(p) == "gcs_server"), None)


def verify_jobs_api(dashboard: str, mode: str, timeout_s: float) -> str | None:
    """Run a trivial job through the Jobs API (what ``ray job submit`` does); None when it succeeded, else why not.

    This exercises the dashboard, the job agent on the head, the job supervisor actor, and the entrypoint's
    ``python`` on the head's PATH: each of them can be broken while ``ray start`` reports success.
    """
    os.environ["RAY_AUTH_MODE"] = mode  # read when Ray's client code first loads its auth config
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(dashboard)
            job = client.submit_job(entrypoint="python -c 'import ray'",
                                    metadata={"defectflow": "local-head.sh start check"})
            break
        except Exception as e:  # the dashboard may need a few seconds; "No available agent" is a 500
            last = f"{type(e).__name__}: {e}".strip()
            time.sleep(2)
    else:
        return f"could not submit ({last})"
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status == JobStatus.SUCCEEDED:
            return None
        if status in (JobStatus.FAILED, JobStatus.STOPPED):
            info = client.get_job_info(job)
            return f"the test job {status.value}: {info.message}\n{client.get_job_logs(job)[-2000:]}"
        time.sleep(1)
    return f"the test job did not finish within {timeout_s:g} s"


def summary(state: dict[str, str], temp_dir: str) -> str:
    auth = state["RAY_AUTH_MODE"]
    client_env = f"RAY_ADDRESS={state['RAY_ADDRESS']}" + (" RAY_AUTH_MODE=token" if auth == "token" else "")
    stop = "cluster/local-head.sh stop" + ("" if temp_dir == DEFAULT_TEMP_DIR else f" --temp-dir {temp_dir}")
    submit = ("" if temp_dir == DEFAULT_TEMP_DIR else f"DEFECTFLOW_HEAD_DIR={temp_dir} ") + "cluster/submit.sh"
    return "\n".join([
        f"Ray head running (logs: {state['SESSION_DIR']}/logs)",
        f"  Jobs API and dashboard: {state['RAY_ADDRESS']}",
        f"  GCS address:            {state['RAY_GCS_ADDRESS']}   (ray status --address ...; ray.init(address=...))",
        f"  Ray client:             {state['RAY_CLIENT_ADDRESS']}",
        f"  token authentication:   {'on: clients need RAY_AUTH_MODE=token' if auth == 'token' else 'off'}",
        f"submit:  {submit} train --config workflows/configs/gmbinet_procedural.yaml",
        f"   or:   {client_env} ray job submit --working-dir . -- python -m workflows.cli ...",
        f"stop:    {stop}",
    ])


# ------------------------------------------------------------------------------------------------- stop


def _terminate(procs: list, grace_s: float = 15.0) -> int:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def stop_session(sid: int) -> int:
    """Stop every process of the head's session: the GCS last (it shuts down within seconds once the raylet is
    gone, but waits out a 15 s grace period when signalled together with it), then anything spawned meanwhile."""
    procs = session_processes(sid)
    gcs = [p for p in procs if _name(p) == "gcs_server"]
    n = _terminate([p for p in procs if p not in gcs], grace_s=10)
    n += _terminate(gcs, grace_s=10)
    n += _terminate(session_processes(sid), grace_s=5)
    return n


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""


def stop(args: argparse.Namespace) -> int:
    state = read_state(args.temp_dir)
    if state is None:
        raise HeadError(f"no head recorded in {state_path(args.temp_dir)}",
                        "pass the --temp-dir the head was started with (`ray stop` would stop every Ray instance "
                        "on this host, not just this head)")
    sid = int(state["SESSION_ID"])
    if not head_alive(state):
        n = stop_session(sid)
        state_path(args.temp_dir).unlink()
        print(f"the head recorded in {args.temp_dir} was not running"
              + (f" ({n} leftover processes stopped)" if n else ""))
        return 0
    n = stop_session(sid)
    state_path(args.temp_dir).unlink(missing_ok=True)
    print(f"stopped the Ray head at {state['RAY_ADDRESS']} ({n} processes); logs remain in {state['SESSION_DIR']}")
    return 0


def status(args: argparse.Namespace) -> int:
    state = read_state(args.temp_dir)
    if state is None:
        print(f"no head recorded in {state_path(args.temp_dir)}")
        return 1
    if not head_alive(state):
        print(f"the head recorded in {args.temp_dir} is not running (stale state; `stop` clears it)")
        return 1
    print(summary(state, args.temp_dir))
    return 0


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    caller_cwd = os.environ.get("DEFECTFLOW_CALLER_CWD") or os.getcwd()
    ray_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, ray_args = argv[:i], argv[i + 1:]
    command = "start"
    if argv and argv[0] in ("start", "stop", "status"):
        command, argv = argv[0], argv[1:]
    if command == "start" and argv and argv[0].isdigit():  # the old `local-head.sh <num_cpus>`
        argv = ["--num-cpus", *argv]
    p = argparse.ArgumentParser(prog=f"cluster/local-head.sh {command}",
                                description="Start/stop one local Ray head (see cluster/README.md).")
    p.add_argument("--temp-dir", default=os.environ.get("DEFECTFLOW_HEAD_DIR", DEFAULT_TEMP_DIR),
                   help=f"Ray's temp dir for this head, also where its state is kept (default {DEFAULT_TEMP_DIR}; "
                        "one head per temp dir)")
    if command == "start":
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
        p.add_argument("--object-store-memory", type=int, default=None, help="bytes (default: Ray's, 30%% of RAM)")
        for name, flag, default, what in PORTS:
            p.add_argument(flag, dest=name, default=None, metavar="PORT|auto",
                           help=f"{what} port (default: {default if default else 'picked by Ray'}"
                                + (", or a free one when taken)" if default else ")"))
        p.add_argument("--dashboard-host", default="127.0.0.1",
                       help="interface of the dashboard / Jobs API (default 127.0.0.1; 0.0.0.0 exposes it)")
        p.add_argument("--auth", choices=["token", "disabled"], default=None,
                       help="token authentication (default: RAY_AUTH_MODE, else token when a token exists)")
        p.add_argument("--no-verify", action="store_true", help="skip the test job through the Jobs API")
        p.add_argument("--verify-timeout", type=float, default=90.0, help="seconds for the test job (default 90)")
    args = p.parse_args(argv)
    args.command = command
    args.ray_args = ray_args
    args.temp_dir = os.path.abspath(os.path.join(caller_cwd, os.path.expanduser(args.temp_dir)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"start": start, "stop": stop, "status": status}[args.command](args)
    except HeadError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
