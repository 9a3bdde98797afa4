"""Run model-written Python (HumanEval completions) in a child process, with limits.

NOT a security boundary: it keeps an honest model's mistakes (infinite loops, huge allocations, a
stray `os.remove` or `shutil.rmtree`) from hurting the evaluation machine; it does not contain
code written to escape. Run untrusted code inside a container or VM.

What it does, per program:
- a fresh temporary working directory (removed afterwards) and a scrubbed environment (PATH, HOME
  = that directory, PYTHONHASHSEED=0, one thread for numeric libraries);
- `python -I -S` (no user site, no site-packages, PYTHON* variables ignored), in its own session so
  that a timeout kills the whole process group;
- inside the child, before the program runs: address-space, CPU-time, file-size and process-count
  limits (`resource`), and destructive calls disabled (os.system / kill / fork / remove / rmdir /
  rename / chmod..., shutil.rmtree / move, subprocess.*), each raising PermissionError;
- a wall-clock timeout in the parent (no signals in the caller: safe from worker threads);
- stdout / stderr captured and capped.

`execute_code(program) -> ExecResult` (success = exit status 0 within the limits);
`execute_many(programs, workers=N)` runs several at once from a thread pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAX_OUTPUT = 64 * 1024

RUNNER = r'''
import builtins, os, resource, shutil, subprocess, sys
memory, cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
source = open("program.py", encoding="utf-8").read()
def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the nanochat sandbox")
    return refuse
for _name in ("system", "kill", "killpg", "fork", "forkpty", "putenv", "unsetenv", "remove", "unlink", "removedirs",
              "rmdir", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
              "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "setgid", "execv", "execve", "execvp",
              "execl", "spawnv", "spawnve", "popen", "posix_spawn", "posix_spawnp", "link", "symlink"):
    if hasattr(os, _name):
        setattr(os, _name, _disabled("os." + _name))
for _name in ("rmtree", "move", "chown", "copytree"):
    setattr(shutil, _name, _disabled("shutil." + _name))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _disabled("subprocess." + _name))
builtins.exit = builtins.quit = _disabled("exit")
for _mod in ("ipdb", "joblib", "psutil", "tkinter", "resource"):
    sys.modules[_mod] = None
del _name, _mod
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
'''


@dataclass
class ExecResult:
    success: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False

    @property
    def error(self) -> str | None:
        if self.success:
            return None
        if self.timed_out:
            return "timed out"
        if self.memory_exceeded:
            return "memory limit exceeded"
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {self.returncode}"


def _scrubbed_env(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}


def execute_code(program: str, timeout: float = 5.0, memory_mb: int = 1024, python: str | None = None) -> ExecResult:
    """Run `program` (Python source) in the sandbox; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as work:
        Path(work, "program.py").write_text(program, encoding="utf-8")
        Path(work, "runner.py").write_text(RUNNER, encoding="utf-8")
        cpu = max(1, int(timeout) + 1)
        cmd = [python or sys.executable, "-I", "-S", "runner.py", str(memory_mb << 20), str(cpu)]
        proc = subprocess.Popen(cmd, cwd=work, env=_scrubbed_env(work), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
        stdout = out[:MAX_OUTPUT].decode("utf-8", "replace")
        stderr = err[-MAX_OUTPUT:].decode("utf-8", "replace")
        # exceeding RLIMIT_CPU ends the process with SIGXCPU: a timeout too
        timed_out = timed_out or proc.returncode == -signal.SIGXCPU
        memory = "MemoryError" in stderr[-2000:]
        return ExecResult(success=proc.returncode == 0 and not timed_out, returncode=proc.returncode, stdout=stdout,
                          stderr=stderr, timed_out=timed_out, memory_exceeded=memory)


def execute_many(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024,
                 workers: int | None = None) -> list[ExecResult]:
    """`execute_code` of each program, `workers` at a time (default: the CPU count), results in order."""
    workers = workers or os.cpu_count() or 1
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: execute_code(p, timeout, memory_mb), programs))
