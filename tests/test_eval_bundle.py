"""nanochat/eval_bundle.py: where the CORE bundle comes from (explicit path, env var, a download served
locally, an offline failure). Parsing task files is tested in tests/test_core_eval.py and
tests/test_reliability.py (corrupt lines)."""

import http.server
import threading
import time
import zipfile
from functools import partial
from pathlib import Path

import pytest

from nanochat import eval_bundle as ce
from tests.helpers import free_port
from tests.test_core_eval import make_bundle


def test_bundle_resolution_order(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path)
    monkeypatch.delenv(ce.EVAL_BUNDLE_ENV, raising=False)
    assert ce.resolve_eval_bundle(bundle, base_dir=tmp_path / "base", download=False) == bundle
    monkeypatch.setenv(ce.EVAL_BUNDLE_ENV, str(bundle))
    assert ce.resolve_eval_bundle(None, base_dir=tmp_path / "base", download=False) == bundle
    with pytest.raises(ce.EvalBundleError, match="is not a CORE eval bundle"):
        ce.resolve_eval_bundle(tmp_path / "nowhere", base_dir=tmp_path / "base")
    monkeypatch.delenv(ce.EVAL_BUNDLE_ENV)
    with pytest.raises(ce.EvalBundleError, match="NANOCHAT_EVAL_BUNDLE"):
        ce.resolve_eval_bundle(None, base_dir=tmp_path / "base", download=False)


def test_bundle_download_unpacks_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv(ce.EVAL_BUNDLE_ENV, raising=False)
    bundle = make_bundle(tmp_path / "src")
    serve = tmp_path / "www"
    serve.mkdir()
    with zipfile.ZipFile(serve / "eval_bundle.zip", "w") as zf:
        for p in bundle.rglob("*"):
            zf.write(p, Path("eval_bundle") / p.relative_to(bundle))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        base = tmp_path / "base"
        got = ce.resolve_eval_bundle(None, base_dir=base, url=url)
    finally:
        server.shutdown()
    assert got == base / "eval_bundle"
    assert (got / "eval_data" / "synthetic" / "mc.jsonl").read_bytes() == (bundle / "eval_data" / "synthetic" / "mc.jsonl").read_bytes()
    assert sorted(p.name for p in base.iterdir()) == ["eval_bundle", "eval_bundle.lock"]  # no temp leftovers
    assert ce.resolve_eval_bundle(None, base_dir=base, url="http://127.0.0.1:1/x.zip") == got  # no second download


def test_offline_download_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv(ce.EVAL_BUNDLE_ENV, raising=False)
    port = free_port()  # nothing listens there: connection refused, like a machine without network
    t0 = time.time()
    with pytest.raises(ce.EvalBundleError) as err:
        ce.resolve_eval_bundle(None, base_dir=tmp_path, url=f"http://127.0.0.1:{port}/eval_bundle.zip", timeout=2)
    assert time.time() - t0 < 10
    msg = str(err.value)
    assert "--eval-bundle" in msg and "NANOCHAT_EVAL_BUNDLE" in msg and str(tmp_path / "eval_bundle") in msg
    assert not (tmp_path / "eval_bundle").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["eval_bundle.lock"]
