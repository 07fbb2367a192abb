"""`python SCRIPT ARGS` as a real process of its own, without paying for `import torch` in each one.

A test that must run a script under environment variables that libraries read once, at import (huggingface_hub
reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE then), cannot call the script's `main` in the pytest process; a fresh
interpreter pays about 1.5 s importing torch before the script does anything. `ScriptServer` starts one interpreter
that imports torch and the other modules named (none of which reads those variables) and then forks a child per
run. The child is a process of its own, as `subprocess.run([sys.executable, SCRIPT, *args])` would start: it sets
the run's environment, working folder and umask, writes to files that become `stdout` and `stderr`, imports
everything else (huggingface_hub included) itself, runs SCRIPT as `__main__`, and ends as the interpreter would
(the exit status of `sys.exit`, a traceback and status 1 for an uncaught exception, death by SIGINT for an uncaught
KeyboardInterrupt, atexit handlers run).

The preloading interpreter is checked to print nothing: a warning printed at `import torch` would be printed once
there and never by a child, where a fresh `python SCRIPT` prints it, so such a server refuses to start.
"""

import json
import locale
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ("torch", "numpy", "safetensors.torch", "PIL.Image")


def _decode(data: bytes) -> str:
    """What `subprocess.run(..., text=True)` makes of a child's output: the locale's encoding, universal newlines."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _default_sigint():
    """As a terminal would start it: a shell without job control starts background commands with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ScriptServer:
    """Runs scripts in children forked from one interpreter that has imported PRELOAD; one run at a time."""

    def __init__(self, preload=PRELOAD):
        self.process = subprocess.Popen(
            [sys.executable, __file__, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            self.process.wait(timeout=60)
            raise RuntimeError(f"the script server did not start: {ready}{self.process.stderr.read()}")

    def run(self, script, args, *, cwd, env, timeout=180, umask=None) -> subprocess.CompletedProcess:
        """`subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True)`."""
        command = [sys.executable, str(script), *map(str, args)]
        with tempfile.TemporaryDirectory(prefix="script-server-") as folder:
            stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {
                "script": str(script),
                "args": command[2:],
                "cwd": str(cwd),
                "env": dict(env),
                "umask": umask,
                "stdout": str(stdout),
                "stderr": str(stderr),
            }
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = int(self._reply(60)["pid"])
            try:
                returncode = int(self._reply(timeout)["returncode"])
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._reply(60)
                raise subprocess.TimeoutExpired(command, timeout) from None
            return subprocess.CompletedProcess(
                command, returncode, _decode(stdout.read_bytes()), _decode(stderr.read_bytes())
            )

    def _reply(self, timeout) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired("script server", timeout)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the script server ended: {self.process.stderr.read()}")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _child(request: dict, control: list[int]):
    """In the forked child: become `python SCRIPT ARGS` with the request's environment, folder, umask and files."""
    import atexit
    import runpy
    import threading

    for fd in control:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if request["umask"] is not None:
        os.umask(request["umask"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    script = os.path.abspath(request["script"])
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code == -signal.SIGINT:  # as the interpreter ends on an uncaught KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def _serve(preload):
    import importlib

    # The control channel moves off fds 0 and 1, which each child points at its own files.
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    with tempfile.TemporaryFile() as printed:
        saved_stderr = os.dup(2)
        os.dup2(printed.fileno(), 2)
        try:
            for name in preload:
                importlib.import_module(name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        printed.seek(0)
        output = printed.read()
    loaded = sorted(name for name in ("huggingface_hub", "diffusers", "transformers", "peft", "accelerate") if name in sys.modules)
    if loaded:  # they read the environment at import: each child must import them under its own
        sys.exit(f"importing {', '.join(preload)} imported {', '.join(loaded)}")
    if output:
        sys.exit(f"importing {', '.join(preload)} printed something, which a fresh interpreter would print: {output!r}")
    replies.write("ready\n")
    replies.flush()
    control = [requests.fileno(), replies.fileno()]
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, control)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve(sys.argv[1:])
