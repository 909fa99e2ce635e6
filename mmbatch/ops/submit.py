"""`mmbatch submit`: run an mmbatch command on a Ray cluster through the Jobs API.

The job's entrypoint is ``python -m mmbatch.cli <args...>`` (shell-quoted). It
works both when mmbatch is installed on the cluster (the setup commands in
``cluster.yaml`` or the container image do that) and when the source is
uploaded with ``--working-dir`` (the job runs inside that folder, so
``python -m`` finds the ``mmbatch`` package there). ``--pip`` adds pip
requirements to the job's runtime_env (for example a wheel of this project).

Authentication (verified against the installed Ray, 2.60):

- the dashboard rejects requests without ``Authorization: Bearer <token>``
  with HTTP 401 ("Missing authentication token") and a wrong token with 403
  when the cluster runs with ``RAY_AUTH_MODE=token``;
- ``JobSubmissionClient`` adds the header by itself only when
  ``RAY_AUTH_MODE=token`` is set in the *client's* environment, and then
  leaves a caller's own ``Authorization`` header alone;
- Ray reads the token from ``RAY_AUTH_TOKEN``, else the file named by
  ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.

We resolve the token from the same three places ourselves and always pass the
header explicitly, so ``mmbatch submit`` works without ``RAY_AUTH_MODE`` on
the laptop. ``RAY_AUTH_MODE=disabled`` on the client turns sending off. The
token is never printed: messages name where it came from, not its value, and
everything we print is passed through :func:`redact`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, TextIO
from urllib.parse import urlsplit

from mmbatch.errors import EXIT_FAIL, EXIT_OK, EXIT_QUARANTINED, EXIT_USAGE

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"          # under the home folder, as Ray does

ENTRYPOINT = ("python", "-m", "mmbatch.cli")
WORKING_DIR_EXCLUDES = [".git", "__pycache__", "*.pyc", ".pytest_cache", "mmbatch-demo", "out"]
# Exit codes of mmbatch itself that survive the trip through the Jobs API:
# bad usage or workflow, finished with quarantined rows.
PASS_THROUGH_EXIT_CODES = (EXIT_USAGE, EXIT_QUARANTINED)


class SubmitError(RuntimeError):
    """A submission problem the user can act on (message is safe to print)."""


@dataclass(frozen=True)
class AuthToken:
    """A cluster token and where it came from. ``repr`` never shows the value."""
    value: str = field(repr=False)
    source: str

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


# --- small pure helpers (tested without Ray) -----------------------------------------
def resolve_token(environ: Optional[Mapping[str, str]] = None,
                  home: Optional[str | Path] = None) -> Optional[AuthToken]:
    """The token to send, looked up in Ray's order; None when there is none.

    ``RAY_AUTH_MODE=disabled`` means "do not send one". A ``RAY_AUTH_TOKEN_PATH``
    that cannot be read is an error (Ray also refuses to fall back silently).
    """
    env = os.environ if environ is None else environ
    if env.get(AUTH_MODE_ENV, "").strip().lower() == "disabled":
        return None
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return AuthToken(value, f"${TOKEN_ENV}")
    path = env.get(TOKEN_PATH_ENV, "").strip()
    if path:
        try:
            value = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"{TOKEN_PATH_ENV}={path} cannot be read: {e.strerror}") from None
        if not value:
            raise SubmitError(f"{TOKEN_PATH_ENV}={path} is empty")
        return AuthToken(value, f"{TOKEN_PATH_ENV}={path}")
    default = Path(home) if home is not None else Path(os.path.expanduser("~"))
    default = default / DEFAULT_TOKEN_FILE
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return AuthToken(value, str(default)) if value else None


def redact(text: str, token: Optional[AuthToken]) -> str:
    """``text`` with every occurrence of the token value replaced."""
    if token is None or not token.value or not text:
        return text
    return text.replace(token.value, "<redacted-token>")


def build_entrypoint(args: Iterable[str]) -> str:
    """The shell command the job runs: ``python -m mmbatch.cli`` + quoted args."""
    args = list(args)
    if not args:
        raise SubmitError("nothing to submit: give the mmbatch command after --")
    if args[0] in ("mmbatch", "python"):
        raise SubmitError(f"give the mmbatch subcommand only (e.g. `-- preprocess wf.yaml`), not {args[0]!r}")
    return shlex.join([*ENTRYPOINT, *args])


def build_runtime_env(working_dir: Optional[str] = None, pip: Iterable[str] = ()) -> Optional[dict]:
    """runtime_env for the job: the uploaded folder and extra pip requirements."""
    env: dict = {}
    if working_dir:
        if "://" not in working_dir:
            p = Path(working_dir).expanduser()
            if not p.is_dir():
                raise SubmitError(f"--working-dir {working_dir}: no such folder")
            working_dir = str(p.resolve())
            env["excludes"] = list(WORKING_DIR_EXCLUDES)
        env["working_dir"] = working_dir
    pip = [p for p in pip if p]
    if pip:
        env["pip"] = pip
    return env or None


def local_paths_not_uploaded(args: Iterable[str], working_dir: Optional[str]) -> list[str]:
    """Relative paths in ``args`` that exist here but will not exist on the cluster."""
    if working_dir:
        return []
    found = []
    for a in args:
        if a.startswith("-") or "://" in a or os.path.isabs(a) or "=" in a:
            continue
        if os.path.exists(a):
            found.append(a)
    return found


def resolve_address(address: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if environ is None else environ
    addr = address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def is_loopback(host: Optional[str]) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (no name is looked up: any other name counts as remote)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_refusal(address: str, token: Optional[AuthToken], insecure: bool = False) -> Optional[str]:
    """Why ``token`` must not go to ``address`` (None when it may): over plain ``http://`` anyone on the
    path reads it, so only to a loopback address (a local head, an SSH tunnel) unless ``insecure``."""
    parts = urlsplit(address)
    if token is None or insecure or parts.scheme != "http" or is_loopback(parts.hostname):
        return None
    return (f"refusing to send the cluster token ({token.source}) over plain http:// to {parts.hostname}: use "
            "https://, or a tunnel to 127.0.0.1 (`ray dashboard cluster.yaml`), or pass --insecure to send it anyway")


def exit_code_for(status: str, driver_exit_code: Optional[int]) -> int:
    """SUCCEEDED -> 0; a failed mmbatch run keeps its documented code 2/3; else 1."""
    if status == "SUCCEEDED":
        return EXIT_OK
    if driver_exit_code in PASS_THROUGH_EXIT_CODES:
        return int(driver_exit_code)
    return EXIT_FAIL


def _auth_hint(token: Optional[AuthToken]) -> str:
    if token is None:
        return ("the cluster has token authentication on and no token was found here. "
                f"Set {TOKEN_ENV}, or {TOKEN_PATH_ENV} to a file holding it, or copy the head's "
                "~/.ray/auth_token to this machine (print it on the head with `ray get-auth-token`).")
    return (f"the cluster rejected the token from {token.source}: it is not this cluster's token. "
            "Use the token of the head node (`ray get-auth-token` on the head).")


# --- the command ----------------------------------------------------------------------
def make_client(address: str, token: Optional[AuthToken]):
    """A JobSubmissionClient that sends ``token`` (raises SubmitError with a safe message)."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = token.header() if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise SubmitError(f"{address}: {_auth_hint(token)}") from None
    except (ConnectionError, requests.exceptions.RequestException) as e:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {address} ({type(e).__name__}). Is the cluster up? "
            "For a cluster started with `ray up cluster.yaml`, open the tunnel first: "
            "`ray dashboard cluster.yaml` (it forwards 127.0.0.1:8265).") from None


def submit_cli(args: list[str], address: Optional[str] = None, wait: bool = False,
               working_dir: Optional[str] = None, pip: Iterable[str] = (),
               job_id: Optional[str] = None, out: TextIO | None = None, err: TextIO | None = None,
               insecure: bool = False) -> int:
    """Submit ``mmbatch <args>`` as a Ray job; returns the CLI exit code.

    Without ``wait`` prints the job id (stdout) and how to follow it (stderr) and
    returns 0. With ``wait`` streams the job's logs and returns 0 when the job
    SUCCEEDED, mmbatch's own code 2/3 when the job exited with it, else 1. A token
    is sent over plain ``http://`` to a loopback address only, unless ``insecure``
    (else one line and 2).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    token: Optional[AuthToken] = None
    try:
        token = resolve_token()
        addr = resolve_address(address)
        refusal = plain_http_refusal(addr, token, insecure)
        if refusal:
            print(f"mmbatch submit: {refusal}", file=err)
            return EXIT_USAGE
        entrypoint = build_entrypoint(args)
        runtime_env = build_runtime_env(working_dir, pip)
        for p in local_paths_not_uploaded(args, working_dir):
            print(f"warning: {p!r} exists here, but the job runs on the cluster and sees only the "
                  "cluster's files: pass --working-dir . to upload this folder", file=err)
        client = make_client(addr, token)
        submission_id = _submit(client, entrypoint, runtime_env, job_id, args, token, addr)
    except SubmitError as e:
        print(f"mmbatch submit: {redact(str(e), token)}", file=err)
        return EXIT_FAIL

    print(submission_id, file=out, flush=True)
    prefix = "RAY_AUTH_MODE=token " if token else ""
    follow = f"{prefix}ray job logs --follow {submission_id} --address {addr}"
    if not wait:
        print(f"submitted {entrypoint!r} to {addr}\n"
              f"  follow: {follow}\n"
              f"  status: {prefix}ray job status {submission_id} --address {addr}\n"
              f"  stop:   {prefix}ray job stop {submission_id} --address {addr}", file=err, flush=True)
        return EXIT_OK
    print(f"submitted {entrypoint!r} to {addr} as {submission_id}; streaming its logs "
          "(Ctrl-C stops following, not the job)", file=err, flush=True)
    try:
        status, code = follow_job(client, submission_id, out, token)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Follow again: {follow}\n"
              f"stop it: {prefix}ray job stop {submission_id} --address {addr}", file=err)
        return EXIT_FAIL
    except SubmitError as e:
        print(f"mmbatch submit: {redact(str(e), token)}", file=err)
        return EXIT_FAIL
    rc = exit_code_for(status, code)
    print(f"job {submission_id} {status}" + (f" (exit code {code})" if code not in (None, 0) else ""),
          file=err, flush=True)
    return rc


def _submit(client, entrypoint: str, runtime_env: Optional[dict], job_id: Optional[str],
            args: list[str], token: Optional[AuthToken], addr: str) -> str:
    import requests
    from ray.exceptions import AuthenticationError

    metadata = {"tool": "mmbatch", "command": args[0], "submitted_by": _user()}
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                 submission_id=job_id, metadata=metadata)
    except AuthenticationError:
        raise SubmitError(f"{addr}: {_auth_hint(token)}") from None
    except requests.exceptions.RequestException as e:
        raise SubmitError(f"lost the connection to {addr} while submitting ({type(e).__name__})") from None
    except (RuntimeError, ValueError) as e:
        raise SubmitError(f"the cluster refused the job: {e}") from None


def _user() -> str:
    try:
        import getpass
        return getpass.getuser()
    except Exception:  # pragma: no cover - no user database in some containers
        return "unknown"


def follow_job(client, submission_id: str, out: TextIO, token: Optional[AuthToken] = None,
               poll_s: float = 1.0) -> tuple[str, Optional[int]]:
    """Print the job's logs as they come; return (final status, driver exit code)."""
    seen = [0]                       # characters already printed (kept when the tail breaks)
    try:
        asyncio.run(_tail(client, submission_id, out, token, seen))
    except Exception:  # websocket refused by a proxy, or closed early: fall back to polling
        pass
    printed = seen[0]
    while True:
        info = client.get_job_info(submission_id)
        status = str(getattr(info.status, "value", info.status))
        try:
            logs = client.get_job_logs(submission_id)
        except Exception:
            logs = ""
        if len(logs) > printed:
            out.write(redact(logs[printed:], token))
            out.flush()
            printed = len(logs)
        if info.status.is_terminal():
            return status, info.driver_exit_code
        time.sleep(poll_s)


async def _tail(client, submission_id: str, out: TextIO, token: Optional[AuthToken], seen: list) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(redact(chunk, token))
        out.flush()
        seen[0] += len(chunk)
