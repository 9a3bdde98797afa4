"""nanochat/run_dir.py: the run record every phase writes and every reader reads, metrics.jsonl, atomic text
writes. (The lock and the cleaning of failed writes are tested in tests/test_reliability.py.)"""

import json

import pytest

from nanochat import run_dir as rd
from nanochat.env import atomic_write_text


def test_run_record_has_one_schema_for_every_phase(tmp_path):
    for phase in ("base", "sft", "rl"):
        folder = tmp_path / phase
        folder.mkdir()
        rd.write_run_record(folder, phase=phase, args={"seed": 1}, model_config={"n_layer": 2},
                            sizing={"matrix_lr": 0.01}, env={"torch": "x"},
                            source=None if phase == "base" else {"phase": "base", "tag": "d2", "step": 5})
        on_disk = json.loads((folder / "run.json").read_text())
        assert set(on_disk) == {"phase", "args", "model_config", "sizing", "env", "source"}
        assert rd.read_run_json(folder) == on_disk
    with pytest.raises(ValueError, match="unknown phase 'chat'"):
        rd.write_run_record(tmp_path, phase="chat", args={}, model_config={}, sizing={}, env={})


def test_older_records_read_in_the_current_schema(tmp_path):
    """SFT and RL used to keep the flags under "config" and resumed_from at the top level."""
    (tmp_path / "run.json").write_text(json.dumps({"config": {"mix": "x"}, "resumed_from": 7, "model_config": {}}))
    info = rd.read_run_json(tmp_path)
    assert info["args"] == {"mix": "x"} and info["env"] == {"resumed_from": 7}
    (tmp_path / "run.json").write_text(json.dumps({"args": {"depth": 4}, "config": {"ignored": 1}}))
    assert rd.read_run_json(tmp_path)["args"] == {"depth": 4}  # a current record is read as written


def test_read_run_json_absent_and_invalid(tmp_path):
    assert rd.read_run_json(tmp_path) is None
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        rd.read_run_json(tmp_path)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        rd.read_run_json(tmp_path)


def test_metrics_writer_keeps_one_record_per_step_across_a_resume(tmp_path):
    w = rd.MetricsWriter(tmp_path, None)
    for step in (1, 2, 3, 4):
        w.write({"step": step, "loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    problems = []
    assert [r["step"] for r in rd.read_metrics(tmp_path, problems)] == [1, 2, 3, 4]
    assert problems == ["metrics.jsonl line 5 is not a JSON object (a run killed mid-write?); skipped"]
    w = rd.MetricsWriter(tmp_path, 2)  # resumed from checkpoint 2: steps 3.. are written again
    w.write({"step": 3, "loss": 30.0})
    assert [(r["step"], r["loss"]) for r in rd.read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    rd.MetricsWriter(tmp_path, None, enabled=False).write({"step": 99})  # other ranks write nothing
    assert len(rd.read_metrics(tmp_path)) == 3


def test_atomic_write_text_replaces_whole_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["run.json"]

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nanochat.env.os.replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "half\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_run_dir_paths_and_bad_tags(tmp_path):
    assert rd.run_dir("sft", "d12", tmp_path) == tmp_path / "chatsft_checkpoints" / "d12"
    for tag in ("", "a/b", "..", None):
        with pytest.raises(ValueError, match="invalid model tag"):
            rd.run_dir("base", tag, tmp_path)
    with pytest.raises(ValueError, match="unknown phase"):
        rd.phase_dir("pre", tmp_path)
