"""lm-evaluation-harness as a real client of the server: its `local-completions` model (tokenizer read from
the server's /tokenize, `tokenizer_backend=remote`) scores hand-made log-likelihood requests and runs a
short generation against `chat_web --source base`; the scores equal the model's own, computed here
without the server. No dataset is downloaded: the requests are built by hand."""

from __future__ import annotations

import pytest
import torch

from tests.chat_fixtures import chat_base_dir, shared_server

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the dev extra) is not installed")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return chat_base_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def long_server(base):
    return shared_server(base, "long")


@pytest.fixture(scope="module")
def long_model(base):
    from nanochat.checkpoint_manager import load_model

    model, tok, _ = load_model("base", "cpu", model_tag="long", base_dir=base)
    return model, tok


@pytest.fixture(scope="module")
def harness(long_server, monkeypatch_module):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch_module.setenv(var, "1")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(base_url=long_server.url + "/v1/completions", model="nanochat-base-long",
                               tokenizer_backend="remote", tokenized_requests=True, max_length=4096,
                               batch_size=1, max_retries=1, timeout=120)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _score(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation | context), greedy?) the way the harness splits the text into tokens."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else [tok.get_bos_token_id()]
    cont = whole[len(tok.encode(context)):] if context else whole
    ids = ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    rows = logp[len(ctx) - 1:len(ids) - 1]
    target = torch.tensor(cont)
    total = float(rows.gather(1, target[:, None]).sum())
    return total, bool((rows.argmax(dim=-1) == target).all())


def test_loglikelihood_requests_score_as_the_model_does(harness, long_model):
    from lm_eval.api.instance import Instance

    model, tok = long_model
    pairs = [("The quick brown fox", " jumps over the lazy dog"), ("Hello there,", " how are you?"),
             ("What is 12 times 3?", " It is 36."), ("", "Count the letters"), ("strawberry has", " three")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = harness.loglikelihood(requests, disable_tqdm=True)
    assert len(got) == len(pairs)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        expect, expect_greedy = _score(model, tok, ctx, cont)
        assert logprob == pytest.approx(expect, abs=1e-3)  # a sum over up to ~10 tokens, each to 1e-4
        assert greedy == expect_greedy


def test_generate_until_equals_greedy_decoding(harness, long_model):
    from lm_eval.api.instance import Instance

    model, tok = long_model
    context = "Hello there, how are"
    ids = tok.encode(context)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    specials = set(tok.special_tokens.values())
    full = tok.decode([t for t in seq[len(ids):] if t not in specials])
    until = full[6:9]
    req = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=(context, {"until": [until], "max_gen_toks": 12, "temperature": 0, "do_sample": False}))
    (text,) = harness.generate_until([req], disable_tqdm=True)
    assert text == full[:full.find(until)]
