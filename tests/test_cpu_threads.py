"""The CPU thread governor: fewer threads while other processes use the cores, back when they leave."""

from pathlib import Path

import pytest
import torch

from nanochat import cpu_threads
from nanochat.cpu_threads import ThreadGovernor, parse_threads, read_cpu_times


class FakeMachine:
    """A 2-core machine: `others` cores busy with other work, this process using `ours` cores."""

    def __init__(self):
        self.t = 0.0
        self.busy = 0.0
        self.own = 0.0
        self.others = 0.0
        self.ours = 1.0
        self.set_calls = []

    def run(self, seconds):
        self.t += seconds
        self.busy += (self.others + self.ours) * seconds
        self.own += self.ours * seconds

    def governor(self, **kw):
        return ThreadGovernor(2, every_s=10.0, clock=lambda: self.t, cpu_times=lambda: (self.busy, 2 * self.t),
                              own_time=lambda: self.own, set_threads=self.set_calls.append, **kw)


def test_idle_machine_keeps_every_thread():
    m = FakeMachine()
    gov = m.governor()
    for _ in range(5):
        m.run(11)
        assert gov.tick() == 2
    assert m.set_calls == [] and gov.others == pytest.approx(0.0)


def test_a_busy_neighbour_takes_a_thread_and_gives_it_back():
    m = FakeMachine()
    said = []
    gov = m.governor(say=said.append)
    m.others = 1.0
    m.run(11)
    assert gov.tick() == 2  # one measurement is not enough
    m.run(11)
    assert gov.tick() == 1 and m.set_calls == [1]
    assert gov.others == pytest.approx(1.0) and "threads 2 -> 1" in said[0]
    m.run(11)
    assert gov.tick() == 1 and m.set_calls == [1]  # stays while the neighbour does
    m.others = 0.0
    m.run(11)
    gov.tick()
    m.run(11)
    assert gov.tick() == 2 and m.set_calls == [1, 2] and gov.changes == 2


def test_a_short_burst_changes_nothing_and_ticks_between_measurements_are_free():
    m = FakeMachine()
    gov = m.governor()
    m.others = 2.0
    m.run(11)
    gov.tick()
    m.others = 0.0
    m.run(11)
    assert gov.tick() == 2 and m.set_calls == []
    calls = []
    gov._cpu_times = lambda: calls.append(1) or (m.busy, 2 * m.t)
    m.run(3)
    gov.tick()
    assert calls == []  # within every_s: not even /proc/stat is read


def test_target_rounds_the_other_load_and_keeps_one_thread():
    gov = ThreadGovernor(4, cpu_times=lambda: (0.0, 0.0), set_threads=lambda n: None)
    assert [gov.target(x) for x in (0.0, 0.4, 0.6, 1.5, 2.4, 3.0, 9.0)] == [4, 4, 3, 2, 2, 1, 1]


def test_read_cpu_times_parses_proc_stat(tmp_path):
    f = tmp_path / "stat"
    f.write_text("cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    hz = __import__("os").sysconf("SC_CLK_TCK")
    busy, total = read_cpu_times(str(f))
    assert busy == pytest.approx((100 + 5 + 50 + 3 + 2) / hz) and total == pytest.approx(980 / hz)
    assert read_cpu_times(str(tmp_path / "absent")) is None


def test_parse_and_configure(monkeypatch):
    assert parse_threads("auto") is None and parse_threads(None) is None and parse_threads("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="'auto' or a number"):
            parse_threads(bad)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("NANOCHAT_THREADS", raising=False)
        assert cpu_threads.configure("1") == "1 (fixed)" and torch.get_num_threads() == 1
        monkeypatch.setenv("NANOCHAT_THREADS", "1")  # the variable fixes what the flags leave at auto
        assert cpu_threads.configure("auto") == "1 (fixed)" and cpu_threads.governor() is None
        monkeypatch.setenv("NANOCHAT_THREADS", "lots")
        with pytest.raises(ValueError, match="from NANOCHAT_THREADS"):
            cpu_threads.configure("auto")
        monkeypatch.delenv("NANOCHAT_THREADS")
        assert cpu_threads.governor() is None
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert "OMP_NUM_THREADS" in cpu_threads.configure("auto") and cpu_threads.governor() is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        summary = cpu_threads.configure("auto")
        if read_cpu_times() is None:
            assert "not following" in summary and cpu_threads.governor() is None
        else:
            assert summary.startswith("auto") and cpu_threads.governor().max_threads == before
        assert cpu_threads.configure("auto", device_type="cuda") == str(before) and cpu_threads.governor() is None
    finally:
        cpu_threads.configure(str(before))
        cpu_threads._GOVERNOR = None


def test_bad_threads_flag_is_a_one_line_error(base_dir):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth", "1", "--threads", "zero",
                        "--num-iterations", "1"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--threads must be 'auto' or a number" in r.stderr
    assert not (base_dir / "base_checkpoints").exists()


def test_tick_acts_only_on_the_configuring_thread(monkeypatch):
    import threading

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NANOCHAT_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        cpu_threads.configure("auto")
        gov = cpu_threads.governor()
        if gov is None:
            pytest.skip("no /proc/stat here")
        calls = []
        gov.tick = lambda: calls.append(threading.get_ident())
        worker = threading.Thread(target=cpu_threads.tick)
        worker.start()
        worker.join()
        assert calls == []  # another thread's OpenMP pool is not ours to resize
        cpu_threads.tick()
        assert calls == [threading.get_ident()]
    finally:
        cpu_threads.configure(str(before))
        cpu_threads._GOVERNOR = None
