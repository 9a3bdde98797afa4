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
    text = rc.training_section(read, plots, eval_tokens=32768)
    # the final checkpoint's val bpb belongs to Evaluation: here only the first point, with its step and tokens
    assert "val bpb at the first evaluation (step 0, 32,768 val tokens) | 3.0000" in text
    assert "2.0000" not in text and "n/a (no known GPU peak)" in text
    alone = rc.training_section(read, plots, eval_tokens=32768, final_in_evaluation=False)
    assert "val bpb at the last evaluation (step 99, 32,768 val tokens) | 2.0000" in alone


def test_evaluation_section_core_table_and_missing():
    result = {"val_bpb": 1.5, "core": 0.1, "missing": ["coqa"], "step": 260, "split_tokens": 65536,
              "tasks": {"piqa": {"accuracy": 0.6, "centered": 0.2, "n": 10}}}
    text = rc.evaluation_section(result)
    assert "| piqa | 0.6000 | 0.2000 | 10 |" in text
    assert "| val bpb, final checkpoint (step 260, 65,536 tokens) | 1.5000 |" in text
    assert text.count("val bpb") == 1  # one figure for the quantity
    assert "CORE = 0.1000" in text and "1 missing: coqa" in text
    assert "no bundle" in rc.evaluation_section({"val_bpb": 1.0, "core": None}, note="no bundle")


def test_gpu_recipe_estimate_matches_sizing():
    est = rc.gpu_recipe_estimate(depth=24, ratio=8, gpus=8, mfu=0.5, peak=1e15)
    c = model_config(24)
    flops = flops_per_token(c) * 8 * count_params(c)["scaling"]
    assert math.isclose(est["flops"], flops)
    assert math.isclose(est["hours"], flops / (8 * 1e15 * 0.5) / 3600)
    assert math.isclose(est["gpu_hours"], 8 * est["hours"])


def test_a_rerun_keeps_the_real_stage_times(tmp_path):
    r = rc.Report(tmp_path)
    r.record_time("train", 1234.0)
    again = rc.Report(tmp_path)  # the re-run, which found training done
    again.record_time("train", 0.4, skipped=True)
    again.record_time("eval", 0.2, skipped=True)  # no earlier time on record: kept, but marked
    assert again.state["stage_seconds"] == {"train": 1234.0, "eval": 0.2}
    text = rc.timing_section(again.state["stage_seconds"], 0, again.state["skipped_stages"])
    assert "| train | 1,234 s (20.6 min) |" in text and "| eval | 0 s (0.0 min) (skipped" in text
    again.record_time("eval", 50.0)  # work done later replaces the mark
    assert again.state["skipped_stages"] == [] and again.state["stage_seconds"]["eval"] == 50.0


def test_learning_rates_shown_as_passed_and_as_used():
    from nanochat.sizing import learning_rates

    used = learning_rates(2048, 256, matrix_lr=0.16, embedding_lr=2.4, unembedding_lr=0.064, scalar_lr=1.0)
    run = {"sizing": dict(used, tokens_per_step=2048),
           "args": {"matrix_lr": 0.16, "embedding_lr": 2.4, "unembedding_lr": 0.064, "scalar_lr": 1.0}}
    text = rc.sizing_section(run)
    assert "| matrix_lr as passed (--matrix-lr) | 0.16 |" in text
    assert "| matrix_lr used (x 0.0625: sqrt(2,048 / 2^19)) | 0.01 |" in text  # 0.16 * sqrt(2048 / 2^19)
    assert "embedding_lr used (x 0.1083: sqrt(2,048 / 2^19) x (width / 768)^-0.5)" in text
    # SFT / RL runs keep their flags under "config": read the same way
    assert "| matrix_lr as passed (--matrix-lr) | 0.16 |" in rc.sizing_section(dict(run, args=None, config=run["args"]))


def test_environment_names_cpu_threads_and_dtype(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NANOCHAT_THREADS", raising=False)
    text = rc.environment_section(tmp_path, dtype="bfloat16")
    assert "| compute dtype (training) | bfloat16 |" in text
    assert "| CPU threads | auto: up to" in text and "| CPU | " in text
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "| CPU threads | 3 (fixed by OMP_NUM_THREADS) |" in rc.environment_section(tmp_path)


def test_sample_replies_spell_tool_calls_as_the_chat_front_ends_do():
    from nanochat.chat_session import ReplyStream, pieces_text
    from tests.chat_helpers import chat_tokenizer

    tok = chat_tokenizer()
    sp = tok.encode_special
    ids = (tok.encode("Let me calculate: ") + [sp("<|python_start|>")] + tok.encode("34-22") + [sp("<|python_end|>")]
           + [sp("<|output_start|>")] + tok.encode("12") + [sp("<|output_end|>")] + tok.encode("\n#### 12")
           + [sp("<|assistant_end|>")] + tok.encode("junk after the stop"))
    stream = ReplyStream(tok)
    pieces = [p for t in ids[:ids.index(sp("<|assistant_end|>")) + 1] for p in stream.feed(t)] + stream.close()
    raw = tok.decode(ids)
    assert "<|python_start|>" in raw
    assert rc.readable_reply(raw) == pieces_text(pieces) == "Let me calculate: <<34-22=12>>\n#### 12"
    # a call the calculator refused (no output) is closed as ReplyStream closes it
    refused = [sp("<|python_start|>")] + tok.encode("2**99") + [sp("<|python_end|>")] + tok.encode(" ok")
    stream = ReplyStream(tok)
    pieces = [p for t in refused for p in stream.feed(t)] + stream.close()
    assert rc.readable_reply(tok.decode(refused)) == pieces_text(pieces) == "<<2**99=>> ok"


def test_chat_section_shows_the_multi_turn_score_and_readable_samples():
    sft = {"tasks": {"EmbeddedChat": {"accuracy": 0.5, "n": 100, "by_kind": {"verse": 0.6, "multiturn": 0.4}}},
           "chatcore": None,
           "samples": {"EmbeddedChat": [{"prompt": "And John 3:17?", "earlier_turns": 1, "correct": True,
                                         "reply": "a<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|>"}]}}
    text = rc.chat_section({"sft": sft})
    assert "| EmbeddedChat: multi-turn (last reply of a 2-3 exchange chat) | 0.4000 |" in text
    assert "**user (after 1 earlier exchange):** And John 3:17?" in text and "a<<1+1=2>>" in text
