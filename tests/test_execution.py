"""The code sandbox: every canonical HumanEval solution passes, `pass` bodies fail; timeouts, memory,
disabled calls, scrubbed environment, temporary cwd, thread safety."""

import json
import threading
import time

import pytest

from nanochat.execution import execute_code, execute_many
from nanochat.tasks import HumanEval


def test_success_output_and_failure():
    ok = execute_code("print('hello')")
    assert ok.success and ok.stdout == "hello\n" and ok.error is None
    bad = execute_code("assert 1 == 2, 'nope'")
    assert not bad.success and "AssertionError: nope" in bad.error
    syntax = execute_code("def f(:\n")
    assert not syntax.success and "SyntaxError" in syntax.stderr


def test_timeout_kills_the_program():
    t0 = time.time()
    r = execute_code("while True:\n    pass\n", timeout=1.0)
    assert r.timed_out and not r.success and r.error == "timed out"
    assert time.time() - t0 < 10
    sleeper = execute_code("import time\ntime.sleep(60)\n", timeout=1.0)  # not CPU-bound: the wall clock stops it
    assert sleeper.timed_out


def test_memory_limit():
    r = execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", memory_mb=256)
    assert not r.success and r.memory_exceeded and "allocated" not in r.stdout
    assert execute_code("x = bytearray(10 * 1024 ** 2)\n", memory_mb=256).success


@pytest.mark.parametrize("call", ["import os; os.system('echo hi')", "import os; os.remove('x')",
                                  "import shutil; shutil.rmtree('/tmp')", "import subprocess; subprocess.run(['ls'])",
                                  "import os; os.kill(1, 9)", "import os; os.fork()", "exit(0)"])
def test_destructive_calls_are_disabled(call):
    r = execute_code(call)
    assert not r.success and "disabled in the nanochat sandbox" in r.stderr


def test_environment_is_scrubbed_and_cwd_is_a_temporary_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SECRET_TOKEN", "s3cret")
    r = execute_code("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\nopen('f.txt', 'w').write('x')\n")
    assert r.success and "SECRET_TOKEN" not in r.stdout
    cwd = r.stdout.splitlines()[1]
    assert "nanochat-exec-" in cwd
    import os

    assert not os.path.exists(cwd)  # removed afterwards, with what the program wrote


def test_safe_from_worker_threads():
    results = [None] * 4

    def work(i):
        results[i] = execute_code(f"print({i} * 2)")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout.strip() for r in results] == ["0", "2", "4", "6"]


@pytest.mark.slow
def test_all_canonical_humaneval_solutions_pass_and_pass_bodies_fail(shared_data, tmp_path):
    rows = [json.loads(line) for line in (shared_data / "chat" / "humaneval.jsonl").read_text().splitlines()]
    assert len(rows) == 164
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = HumanEval("test", task_data=tmp_path)
    convs = list(task)
    # the reference completion (prompt + canonical solution, as the SFT target) in a markdown fence
    good = [task.program(c, f"```python\n{c['messages'][1]['content']}```") for c in convs]
    empty = [task.program(c, c["messages"][0]["content"] + "    pass\n") for c in convs]
    t0 = time.time()
    results = execute_many(good + empty, timeout=10.0, workers=8)
    elapsed = time.time() - t0
    failed = [convs[i]["task_id"] + ": " + str(r.error) for i, r in enumerate(results[:164]) if not r.success]
    assert not failed, failed
    passed_empty = [convs[i]["task_id"] for i, r in enumerate(results[164:]) if r.success]
    assert not passed_empty, passed_empty
    assert elapsed < 60, elapsed
    assert task.evaluate(convs[0], convs[0]["messages"][1]["content"])  # the Task's own evaluate
