"""Report card: sections update independently, plots are written, tables and estimates are right."""

import json
import math

from nanochat import report as rc
from nanochat.run_dir import read_metrics
from nanochat.sizing import count_params, flops_per_token, model_config


def test_sections_update_in_order_and_survive_reload(tmp_path):
    r = rc.Report(tmp_path, title="t")
    r.set("training", "## Training\n\nfirst")
    r.set("environment", "## Environment\n\nenv")
    r.set("training", "## Training\n\nsecond")
    text = (tmp_path / "report.md").read_text()
    assert text.index("## Environment") < text.index("## Training")
    assert "second" in text and "first" not in text
    again = rc.Report(tmp_path, title="t")  # another process picks up the other sections
    again.set("evaluation", "## Evaluation\n\nx")
    text = (tmp_path / "report.md").read_text()
    assert "env" in text and "second" in text and "## Evaluation" in text


def test_plots_and_training_section(tmp_path):
    metrics = [{"step": s, "loss": 5 - s / 50, "flops": (s + 1) * 1e12, "tokens": (s + 1) * 2048,
                "tok_per_sec": 1000.0, "mfu": None} for s in range(100)]
    metrics[0]["val_bpb"] = 3.0
    metrics[-1]["val_bpb"] = 2.0
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in metrics) + "\n{torn")  # a killed run's last line
    read = read_metrics(path)
    assert len(read) == 100
    plots = rc.plot_training(read, tmp_path)
    assert plots == ["curve_vs_step.png", "curve_vs_flops.png"]
    for p in plots:
        assert (tmp_path / p).read_bytes()[:4] == b"\x89PNG"
    text = rc.training_section(read, plots)
    assert "final val bpb | 2.0000" in text and "n/a (no known GPU peak)" in text


def test_evaluation_section_core_table_and_missing():
    result = {"val_bpb": 1.5, "core": 0.1, "missing": ["coqa"],
              "tasks": {"piqa": {"accuracy": 0.6, "centered": 0.2, "n": 10}}}
    text = rc.evaluation_section(result)
    assert "| piqa | 0.6000 | 0.2000 | 10 |" in text
    assert "CORE = 0.1000" in text and "1 missing: coqa" in text
    assert "no bundle" in rc.evaluation_section({"val_bpb": 1.0, "core": None}, note="no bundle")


def test_gpu_recipe_estimate_matches_sizing():
    est = rc.gpu_recipe_estimate(depth=24, ratio=8, gpus=8, mfu=0.5, peak=1e15)
    c = model_config(24)
    flops = flops_per_token(c) * 8 * count_params(c)["scaling"]
    assert math.isclose(est["flops"], flops)
    assert math.isclose(est["hours"], flops / (8 * 1e15 * 0.5) / 3600)
    assert math.isclose(est["gpu_hours"], 8 * est["hours"])
