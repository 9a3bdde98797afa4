"""scripts/chat_cli.py under a pseudo-terminal (pexpect), as a user runs it, against the tiny trained model."""

from __future__ import annotations

import sys

import pytest

from tests.chat_fixtures import EMOJI_REPLY, REPO_ROOT, chat_base_dir, subprocess_env

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return chat_base_dir(tmp_path_factory)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests decode on one thread, like the subprocesses (OMP_NUM_THREADS=1): on a loaded
    2-core machine two OpenMP threads made decoding ~30x slower (benchmarks/results/chat_serve.md)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spawn(base, *flags, timeout=90):
    return pexpect.spawn(sys.executable, ["-m", "scripts.chat_cli", *flags], cwd=str(REPO_ROOT),
                         env=subprocess_env(base), encoding="utf-8", timeout=timeout, dimensions=(40, 200))


def test_prompt_prints_one_reply_with_the_emoji_intact(base):
    child = spawn(base, "-p", "hi", "-t", "0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before.strip() == EMOJI_REPLY  # the emoji is 4 byte tokens here: printed whole, once
    assert "\ufffd" not in child.before


def test_reply_streams_while_it_is_generated(base, monkeypatch):
    """In-process: the reply reaches the terminal piece by piece, each write flushed, before it ends."""
    from nanochat.chat_session import load_chat_model
    from nanochat.engine import Engine
    from scripts.chat_cli import parse_args, reply

    model, tok, _, _ = load_chat_model("base", "cpu", "long", base_dir=base)

    class Terminal:
        def __init__(self):
            self.writes, self.flushes = [], 0

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            self.flushes += 1

    term = Terminal()
    text = reply(Engine(model, tok), tok, [{"role": "user", "content": "hi"}], parse_args(["--max-tokens", "40"]), 0,
                 out=term)
    assert len(term.writes) > 20 and term.flushes >= len(term.writes) - 1
    assert "".join(term.writes) == text + "\n"


def test_interactive_history_outgrows_the_context(base):
    child = spawn(base, "-t", "0", "--max-tokens", "24")
    child.expect("context 64 tokens")
    child.expect("User: ")
    child.sendline("hi")
    child.expect("Assistant: ")
    child.expect("User: ")
    assert EMOJI_REPLY in child.before
    for _ in range(3):  # each turn adds ~30 tokens; the model's context is 64
        child.sendline("What is 12 times 3?")
        child.expect("User: ")
    log = child.before
    child.sendline("What is 12 times 3?")
    child.expect(r"note: dropped the \d+ oldest messages to fit the model's context of 64 tokens")
    child.expect("It is <<12\\*3=36>>, so 36.")
    child.expect("User: ")
    child.sendline("clear")
    child.expect("new conversation")
    child.expect("User: ")
    child.sendline("hi")
    child.expect("Assistant: ")
    child.expect("User: ")
    assert EMOJI_REPLY in child.before and "note:" not in child.before
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, log


def test_missing_checkpoint_is_a_one_line_error(base, monkeypatch, capsys):
    from scripts.chat_cli import main

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    assert main(["--source", "rl", "-p", "hi"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot load a rl model" in lines[0] and "chat_rl.py" in lines[0]


def test_an_empty_reply_is_fine(base, capsys):
    """A model that ends its turn at once: an empty line, no error, and the next turn still works."""
    from nanochat.chat_session import fit_prompt
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    from scripts.chat_cli import parse_args, reply
    from tests.test_engine import ScriptedModel

    tok = get_tokenizer(base)
    messages = [{"role": "user", "content": "hi"}]
    prompt = fit_prompt(tok, messages, 64, 16).tokens
    engine = Engine(ScriptedModel(prompt + [tok.encode_special("<|assistant_end|>")], tok.get_vocab_size()), tok)
    assert reply(engine, tok, messages, parse_args([]), 0) == ""
    assert capsys.readouterr().out == "\n"
    messages += [{"role": "assistant", "content": ""}, {"role": "user", "content": "again"}]
    assert fit_prompt(tok, messages, 64, 16).tokens[:len(prompt)] == prompt


def test_garbage_written_into_the_model_file_is_a_clear_error_not_gibberish(base, tmp_path):
    """28 KB of garbage in the middle of the model file (tensor data: torch.load alone takes it): chat_cli
    refuses it in one line naming the file, exit 2, instead of chatting with the damaged weights."""
    import shutil
    import subprocess

    from tests.chat_fixtures import subprocess_env
    from tests.test_checkpoint_manager import overwrite_middle

    own = tmp_path / "base"
    shutil.copytree(base, own)
    path = own / "base_checkpoints" / "long" / "model_000001.pt"
    overwrite_middle(path)
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--source", "base", "--model-tag", "long",
                          "-p", "hi", "-t", "0"], cwd=REPO_ROOT, env=subprocess_env(own), capture_output=True,
                         text=True, timeout=120, check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("chat_cli: cannot load a base model: ") and out.stdout == ""
    assert f"{path} is corrupt: its CRC-32 is" in lines[0] and "restore it, or load another step" in lines[0]
