"""`python SCRIPT ARGS` as a real process of its own, without paying for `import torch` in each one.

A test that runs a script under environment variables that libraries read once, at import (huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE then), or that checks what the process prints and exits with, runs the
script in a process of its own; a fresh interpreter pays about 1.5 s importing torch before the script does
anything, and 3 s more for diffusers and transformers.

`ScriptServer` starts one interpreter that imports a list of modules and then forks a child per run. The child is a
process of its own, as `subprocess.run([sys.executable, SCRIPT, *args])` starts one: it sets the run's environment,
working folder and umask, writes to files that become `stdout` and `stderr`, imports everything else itself, runs
SCRIPT as `__main__`, and ends as the interpreter does (the exit status of `sys.exit`, a traceback and status 1 for
an uncaught exception, a traceback and death by SIGINT for an uncaught KeyboardInterrupt, atexit handlers run).

A run's environment must be the server's but for variables that none of the preloaded modules reads at import:
TORCH serves any values of the Hub's variables (and is checked not to import huggingface_hub), LIBRARIES serves its
own environment only. `ScriptServers` keeps a server per preload list and environment. The preloading interpreter
is checked to print nothing: a warning printed at an import would be printed once there and never by a child,
where a fresh `python SCRIPT` prints it, so such a server refuses to start.
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

# What every script imports and no library reads an environment variable of ours for: the server for runs whose
# environments differ only in the Hub's variables (HUB_VARIABLES).
TORCH = ("torch", "numpy", "safetensors.torch", "PIL.Image")
# ... and the libraries the scripts build on, up to (not including) the modules that print a warning when imported
# (diffusers' pipelines import transformers' image processors, which warn that torchvision is missing: the scripts
# silence that themselves, and the children must go through that). They read the environment at import
# (huggingface_hub, HF_HOME and the caches): a server that preloads them serves runs under its own environment only.
LIBRARIES = TORCH + (
    "tqdm.auto",
    "transformers",
    "diffusers",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "transformers.models.clip.modeling_clip",
    "peft",
    "accelerate",
)
HUB_VARIABLES = ("HF_", "HUGGINGFACE_")  # read by huggingface_hub and what is built on it, never by TORCH
# pytest names the running test in its environment, so each test's differs; no library reads it at import (only
# their testing helpers read it, when called).
ALWAYS_FREE = ("PYTEST_CURRENT_TEST",)
READ_AT_IMPORT = ("huggingface_hub", "diffusers", "transformers", "peft", "accelerate")


def _decode(data: bytes) -> str:
    """What `subprocess.run(..., text=True)` makes of a child's output: the locale's encoding, universal newlines."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _default_sigint():
    """As a terminal would start it: a shell without job control starts background commands with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ScriptServer:
    """Runs scripts in children forked from one interpreter that has imported `preload` under `env`; one run at a
    time. A run's environment may differ from `env` only in the variables that start with `free`."""

    def __init__(self, preload, env, free=()):
        self.preload, self.env, self.free = tuple(preload), dict(env), (*free, *ALWAYS_FREE)
        self.process = subprocess.Popen(
            [sys.executable, __file__, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            preexec_fn=_default_sigint,
        )
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            self.process.wait(timeout=60)
            raise RuntimeError(f"the script server did not start: {ready}{self.process.stderr.read()}")

    def serves(self, env) -> bool:
        """Whether a run under `env` is the run a fresh interpreter would make."""
        names = set(env) | set(self.env)
        return all(env.get(name) == self.env.get(name) for name in names if not name.startswith(self.free))

    def run(self, script, args, *, cwd, env, timeout=300, umask=None):
        """`subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True)`, with
        the child's umask set to `umask` if given."""
        if not self.serves(env):
            raise ValueError(f"this server preloaded under another environment: it cannot run {script} as it is")
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


class ScriptServers:
    """The session's servers, started on first use: one that preloads TORCH per environment outside the Hub's
    variables, one that preloads LIBRARIES per environment."""

    def __init__(self):
        self.servers = []

    def run(self, script, args, *, cwd=None, env=None, libraries=False, **options) -> subprocess.CompletedProcess:
        """`python SCRIPT ARGS` in `cwd` under `env` (default: this process's folder and environment), as
        `ScriptServer.run`.

        `libraries`: from a server that has imported LIBRARIES too, for scripts that import them; the first run
        under an environment starts that server (several seconds), so use it for environments that many runs share.
        """
        env = dict(os.environ if env is None else env)
        cwd = os.getcwd() if cwd is None else cwd
        preload, free = (LIBRARIES, ()) if libraries else (TORCH, HUB_VARIABLES)
        server = next((s for s in self.servers if s.preload == preload and s.serves(env)), None)
        if server is None:
            server = ScriptServer(preload, env, free)
            self.servers.append(server)
        return server.run(script, args, cwd=cwd, env=env, **options)

    def close(self):
        for server in self.servers:
            server.close()


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
    loaded = sorted(name for name in READ_AT_IMPORT if name in sys.modules)
    if loaded and not set(preload) & set(
        READ_AT_IMPORT
    ):  # they read the environment at import: each child must import them under its own
        sys.exit(f"importing {', '.join(preload)} imported {', '.join(loaded)} too")
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
