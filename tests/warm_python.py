"""`python -m MODULE ARGS` for the suite's many short CLI runs, without paying the imports each time.

A run of the package's CLI spends ~5 s (more on a loaded machine) importing jax, flax, optax, orbax, grain and TFDS
before it does anything. One warm server per pytest process (started on first use) imports them once, never
starting an XLA backend (no computation, no compile: nothing a fork could break), then forks a child per run. The
child runs the module as `python -m` does (`runpy`, `__main__`, the real flag parsing), with the caller's working
directory, environment, stdout and stderr (file descriptors passed over a Unix socket), and exits like an
interpreter (non-daemon threads joined, atexit handlers, buffers flushed). Its pid is the run's: a test signals and
kills it, reads its /proc children and its lock file as it would a subprocess's. What the run does after its imports
(tracing, compiling, training, writing, exiting) is what a fresh process does.

`run` and `Popen` are drop-ins for `subprocess.run(..., capture_output=True, text=True)` and `subprocess.Popen` of a
`python -m MODULE` or `python SCRIPT.py` command. A run whose environment differs from the server's in anything read
at import time, or any other command, falls back to a plain subprocess; so does everything under
HARMOCLIP_TESTS_COLD=1 (to compare).
"""
from __future__ import annotations

import array
import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile

# Imported by the server before it forks: what the package's CLI runs import, except the `__main__` modules
# themselves (`runpy` executes those afresh; absl flags they define at import would otherwise be defined twice).
PRELOAD = ("numpy", "jax", "flax.nnx", "optax", "orbax.checkpoint", "grain", "tensorflow_datasets", "absl.app",
           "ml_collections", "PIL.Image", "harmoclip_jax.train", "harmoclip_jax.inference",
           "harmoclip_jax.data.pipeline", "harmoclip_jax.evaluators", "harmoclip_jax.metrics_writer")
# Environment variables that may differ between the server and a run: read after the imports (XLA reads XLA_FLAGS
# when the run starts its backend; the package reads HARMOCLIP_* and the launch variables when it runs).
_PER_RUN_ENV = ("XLA_FLAGS", "HARMOCLIP_", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "PYTEST_")


def _comparable(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(_PER_RUN_ENV)}


# ------------------------------------------------------------------------------------------------ the server


def _receive_request(connection: socket.socket) -> tuple[dict, list[int]]:
    """One length-prefixed JSON request and the file descriptors sent with it."""
    fds = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(1 << 16, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        more = connection.recv(1 << 16)
        if not more:
            raise EOFError
        data += more
    return json.loads(data[4:]), list(fds)


def _reply(connection: socket.socket, message: dict) -> None:
    try:
        connection.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the caller is gone; the run is not its concern any more
        pass


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m MODULE ARGS` and exit with its code (never returns)."""
    import runpy
    import threading
    import traceback

    code = 1
    try:
        if request.get("new_session"):
            os.setsid()
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in {stdin, *fds} - {0, 1, 2}:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        try:
            if request.get("module"):
                sys.path[0] = os.getcwd()  # `python -m` puts its working directory first
                sys.argv = [request["module"], *request["args"]]
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            else:
                sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))  # a script's own folder
                sys.argv = [request["script"], *request["args"]]
                runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as error:
            if error.code is None or isinstance(error.code, int):
                code = error.code or 0
            else:
                print(error.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback, exit code 1
            traceback.print_exc()
        threading._shutdown()  # the interpreter's exit: non-daemon threads first, then the atexit handlers
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve(path: str) -> None:
    """Imports PRELOAD, then serves runs: one thread (so every fork is safe), a select loop over the listening
    socket, with the children reaped as they end and each exit status sent to its caller."""
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    callers: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            connection, _ = listener.accept()
            try:
                request, fds = _receive_request(connection)
            except (EOFError, OSError, ValueError):
                connection.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                connection.close()
                for other in callers.values():
                    other.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            _reply(connection, {"pid": pid})
            callers[pid] = connection
        while callers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = callers.pop(pid, None)
            if connection is not None:
                _reply(connection, {"returncode": os.waitstatus_to_exitcode(status)})
                connection.close()


# ------------------------------------------------------------------------------------------------ the callers


class _Server:
    """This process's warm server (started on first use, killed at exit)."""

    def __init__(self, env: dict, cwd: str):
        self.directory = tempfile.mkdtemp(prefix="harmoclip-warm-")
        self.path = os.path.join(self.directory, "socket")
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path], cwd=cwd, env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        self.ready = self.process.stdout.readline().strip() == "ready"
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self.ready and self.process.poll() is None

    def stop(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


# One server per environment (what is compared of it), started on first use; a few at most (each holds its imports).
_SERVERS: dict[tuple, _Server] = {}
_MAX_SERVERS = 3


def _server_for(command, cwd, env) -> _Server | None:
    """A warm server that can run `command` (`python -m MODULE ...` or `python SCRIPT.py ...`) with `env`; None
    for any other command, under HARMOCLIP_TESTS_COLD=1, or when a server would not start."""
    if os.environ.get("HARMOCLIP_TESTS_COLD") == "1":
        return None
    if len(command) < 2 or command[0] != sys.executable or not (
            command[1] == "-m" and len(command) > 2 or command[1].endswith(".py")):
        return None
    comparable = _comparable(os.environ if env is None else env)  # also the server's own: it runs nothing per run
    key = tuple(sorted(comparable.items()))
    server = _SERVERS.get(key)
    if server is None:
        if len(_SERVERS) >= _MAX_SERVERS:
            return None
        server = _SERVERS[key] = _Server(comparable, str(cwd or os.getcwd()))
    return server if server.alive() else None  # one that died stays dead: plain subprocesses for that environment


def _fd_for(stream, stack: list):
    """The file descriptor a child writes `stream` (Popen's stdout/stderr argument) to; PIPE becomes a temporary
    file read back by `communicate`."""
    if stream is None or stream == subprocess.STDOUT:
        return None, None
    if stream == subprocess.DEVNULL:
        handle = open(os.devnull, "wb")
        stack.append(handle)
        return handle.fileno(), None
    if stream == subprocess.PIPE:
        handle = tempfile.TemporaryFile()
        stack.append(handle)
        return handle.fileno(), handle
    return (stream if isinstance(stream, int) else stream.fileno()), None


class _WarmProcess:
    """The parts of `subprocess.Popen` the suite uses (text mode), for a child of the warm server."""

    def __init__(self, server: _Server, command, cwd, env, stdout, stderr, new_session):
        self.args = list(command)
        self.returncode = None
        self._handles: list = []
        out_fd, self._out = _fd_for(stdout, self._handles)
        err_fd, self._err = _fd_for(stderr, self._handles)
        out_fd = sys.stdout.fileno() if out_fd is None else out_fd
        err_fd = out_fd if stderr == subprocess.STDOUT else sys.stderr.fileno() if err_fd is None else err_fd
        fds = [out_fd, err_fd]
        self._buffer = b""
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(server.path)
        what = {"module": command[2], "args": list(command[3:])} if command[1] == "-m" else {
            "script": command[1], "args": list(command[2:])}
        request = {**what, "cwd": str(cwd or os.getcwd()), "env": dict(os.environ if env is None else env),
                   "new_session": bool(new_session)}
        data = json.dumps(request).encode()
        self._socket.sendmsg([struct.pack("!I", len(data)) + data],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        self.pid = self._message(None)["pid"]

    def _message(self, timeout) -> dict | None:
        """The next message from the server; None when `timeout` passes first (0: do not wait)."""
        while b"\n" not in self._buffer:
            self._socket.settimeout(timeout)
            try:
                more = self._socket.recv(4096)
            except (TimeoutError, BlockingIOError, socket.timeout):
                return None
            if not more:
                raise RuntimeError(f"the warm test server stopped while running {self.args}")
            self._buffer += more
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self):
        if self.returncode is None:
            message = self._message(0)
            if message is not None:
                self._finish(message["returncode"])
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            message = self._message(timeout)
            if message is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish(message["returncode"])
        return self.returncode

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        self._socket.close()
        for handle in [h for h in self._handles if h not in (self._out, self._err)]:  # PIPEs: communicate reads them
            handle.close()
        self._handles = [h for h in self._handles if h in (self._out, self._err)]

    def send_signal(self, sig) -> None:
        if self.poll() is None:  # the pid is the child's until its exit is reported
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout=None):
        self.wait(timeout)
        result = []
        for handle in (self._out, self._err):
            if handle is None:
                result.append(None)
            else:
                handle.seek(0)
                result.append(handle.read().decode(errors="replace"))
        for handle in self._handles:
            handle.close()
        self._handles = []
        return tuple(result)


def Popen(command, *, cwd=None, env=None, stdout=None, stderr=None, start_new_session=False, text=None):  # noqa: N802
    """`subprocess.Popen(command, ...)` (text mode); a child of the warm server when it can run it."""
    server = _server_for(command, cwd, env)
    if server is None:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                start_new_session=start_new_session, text=text)
    return _WarmProcess(server, command, cwd, env, stdout, stderr, start_new_session)


def run(command, *, cwd=None, env=None, timeout=None) -> subprocess.CompletedProcess:
    """`subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`; a child of the
    warm server when it can run it."""
    process = Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # as `python -m` has it (running this file put tests/ there)
    serve(sys.argv[1])
