"""`moeflash compare`: bits per byte, task scoring, routing reports, and the command end to end, with
known numbers where a model is rigged to give them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from moeflash.cli import main
from moeflash.evaluate.corpora import DOMAINS, builtin_text, load_text
from moeflash.evaluate.routing import report
from moeflash.evaluate.scoring import bits_per_byte, continuation_logprob, greedy_answer
from moeflash.evaluate.tasks import load_tasks, normalize_answer
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.build import build_tiny


@pytest.fixture(scope="module")
def flat_tiny():
    """The tiny V4 model with a zero head: every token has probability 1/V, so a byte-tokenized
    ASCII text scores exactly log2(V) bits per byte."""
    model = build_tiny("float32")
    with torch.no_grad():
        model.head.weight.zero_()
    return model


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab(flat_tiny):
    text = builtin_text("code", 700)
    r = bits_per_byte(flat_tiny, ByteTokenizer(), text, window=64)
    assert r["tokens"] == r["bytes"] == len(text.encode())  # bytes: every token predicted once
    assert r["bits_per_byte"] == pytest.approx(math.log2(flat_tiny.config.vocab_size), rel=1e-6)


def test_bits_per_byte_equals_transformers():
    """The tiny llama scored by moeflash and by transformers on the same tokens (windows of 40: the
    first from BOS, each later one from the token before it)."""
    from tests.test_llama import CONFIGS, build

    cfg = CONFIGS["tied-gqa"]
    hf, model = build(cfg)
    tok = ByteTokenizer()
    assert tok.vocab_size <= cfg.vocab_size
    tok.bos_token_id = cfg.bos_token_id
    text = builtin_text("prose", 150)
    ids = tok.encode(text, special=False)
    r = bits_per_byte(model, tok, text, window=40)
    bits, prev = 0.0, cfg.bos_token_id
    with torch.no_grad():
        for s in range(0, len(ids), 40):
            piece = ids[s:s + 40]
            inp = torch.tensor([[prev] + piece[:-1]])
            lp = torch.log_softmax(hf(inp).logits[0].double(), -1)
            bits -= float(lp[torch.arange(len(piece)), torch.tensor(piece)].sum()) / math.log(2)
            prev = piece[-1]
    assert r["bits"] == pytest.approx(bits, rel=1e-5)


def test_choices_and_their_normalised_scores(flat_tiny):
    tok = ByteTokenizer()
    v = math.log(flat_tiny.config.vocab_size)
    lp, nbytes = continuation_logprob(flat_tiny, tok, "Q: which? A: ", "yes")
    # the prompt's trailing space moves to the continuation: " yes" is 4 tokens at -ln V each
    assert nbytes == 4 and lp == pytest.approx(-4 * v, rel=1e-6)


class Speller:
    """A stub model that writes `answer` after any prompt: its logits depend only on the position."""

    def __init__(self, answer: str, tok: ByteTokenizer, vocab: int):
        self.ids = tok.encode(answer, special=False) + [tok.eos_token_id]
        self.vocab, self.prompt_len = vocab, None
        self.config = SimpleNamespace(vocab_size=vocab)

    def new_seq_state(self):
        return SimpleNamespace(pos=0)

    def forward_tokens(self, tokens, seqs, lengths):
        if self.prompt_len is None:
            self.prompt_len = lengths[0]
        start = seqs[0].pos
        return torch.arange(start, start + lengths[0]).float().unsqueeze(1)

    def logits(self, x):
        out = torch.zeros(x.shape[0], self.vocab)
        for r, pos in enumerate(x[:, 0].long().tolist()):
            out[r, self.ids[min(pos + 1 - self.prompt_len, len(self.ids) - 1)]] = 1.0
        return out


def test_exact_match_tasks(tmp_path):
    from moeflash.evaluate.compare import score_tasks

    tok = ByteTokenizer()
    model = Speller("The Paris!\nmore", tok, 300)
    assert greedy_answer(model, tok, "Capital of France?") == "The Paris!"  # up to the end of the line
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Capital of France?", "answer": "paris", "tag": "geo"},
        {"prompt": "Capital of Italy?", "answer": "Rome", "tag": "geo"},
    ]) + "\n")
    res = []
    for t in load_tasks(tasks):
        model.prompt_len = None
        res.append(score_tasks(model, tok, [t], 16))
    assert [r["overall"]["accuracy"] for r in res] == [1.0, 0.0]


def test_multiple_choice_accuracy(flat_tiny, tmp_path):
    from moeflash.evaluate.compare import score_tasks

    tasks = tmp_path / "mc.jsonl"
    # a uniform model: the summed log-likelihood prefers the shortest choice (per byte they all tie, so
    # accuracy_norm is left to rounding here and not asserted)
    tasks.write_text(json.dumps({"prompt": "Pick:", "choices": ["long answer", "ab"], "answer_index": 1}) + "\n"
                     + json.dumps({"prompt": "Pick:", "choices": ["no", "yes", "x"], "answer_index": 0}) + "\n")
    r = score_tasks(flat_tiny, ByteTokenizer(), load_tasks(tasks), 4)
    assert r["overall"]["n"] == 2 and r["overall"]["accuracy"] == 0.5


@pytest.mark.parametrize("line,msg", [
    ("not json", "line 1: not JSON"),
    ('["a"]', "expected an object"),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": "q"}', 'needs "answer"'),
    ('{"prompt": "q", "choices": ["a"], "answer_index": 0}', "at least two"),
    ('{"prompt": "q", "choices": ["a", "b"], "answer_index": 2}', '"answer_index" must be an integer in [0, 2)'),
    ('{"prompt": "q", "choices": ["a", "b"], "answer_index": true}', '"answer_index"'),
    ('{"prompt": "q", "answer": 3}', '"answer" must be a string'),
])
def test_bad_task_files(tmp_path, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_tasks(f)


def test_llama_parameter_count_equals_transformers():
    from tests.test_llama import CONFIGS, build

    for cfg in CONFIGS.values():
        hf, _ = build(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    from moeflash.config import LlamaConfig

    assert 134e6 < LlamaConfig().num_parameters() < 135e6  # SmolLM2-135M: 134,515,008


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_builtin_texts_are_fixed_and_cut_at_lines():
    for d in DOMAINS:
        a, b = builtin_text(d, 3000), builtin_text(d, 3000)
        assert a == b and 0 < len(a.encode()) <= 3000 and a.endswith("\n")
    with pytest.raises(ValueError, match="neither a file nor a built-in domain"):
        load_text("nope", 100)


def test_routing_report_known_numbers():
    meta = {"layers": 2, "experts": 4, "top_k": 1, "expert_bytes": 10}
    counts = {"a": [[5, 5, 5, 5], [20, 0, 0, 0]], "b": [[5, 5, 5, 5], [0, 0, 0, 20]]}
    trace = {"a": [[[t % 4], [0]] for t in range(20)]}
    r = report(counts, meta, trace, budgets=(0.5,))
    assert r["uniform_entropy_bits"] == 2.0
    assert r["texts"]["a"]["entropy_bits_per_layer"] == [2.0, 0.0]
    assert r["texts"]["a"]["entropy_vs_uniform"] == 0.5
    assert r["texts"]["a"]["max_load_vs_mean_per_layer"] == [1.0, 4.0]
    # top-1 experts: layer 0 ties -> expert 0 in both; layer 1: expert 0 vs expert 3
    assert r["top_expert_overlap"]["a / b"]["per_layer"] == [1.0, 0.0]
    c = r["cache"]["a"]["0.5"]
    assert c["capacity_experts"] == 4
    assert c["hit_rate"]["belady"] >= max(c["hit_rate"]["lru"], c["hit_rate"]["lfu"])


def test_compare_command_end_to_end(tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"prompt": "1 + 1 =", "choices": [" 2", " 3"], "answer_index": 0, "tag": "math"})
                     + "\n" + json.dumps({"prompt": "Say hi:", "answer": "hi"}) + "\n")
    args = ["compare", "--models", "tiny", "smollm2", "--text", "code", "prose", "--max-bytes", "300",
            "--window", "64", "--rounds", "1", "--tasks", str(tasks), "--json", "--threads", "2"]
    assert main(args + ["--plot", str(tmp_path / "q.png"), "--heatmap", str(tmp_path / "h.png")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (tmp_path / "q.png").stat().st_size > 0 and (tmp_path / "h.png").stat().st_size > 0
    tiny, smol = first["models"]
    assert tiny["architecture"] == "moe" and smol["architecture"] == "dense"
    assert tiny["activated_params"] < tiny["params"] and smol["activated_params"] == smol["params"]
    for m in (tiny, smol):
        assert set(m["text"]) == {"code", "prose"}
        assert m["tasks"]["overall"]["n"] == 2 and set(m["tasks"]) == {"math", "all", "overall"}
        assert m["speed"]["decode_tokens_per_s"] > 0 and m["usd_per_million"]["output"] > 0
    # a real model reads Python far better than a random one
    assert smol["text"]["code"]["bits_per_byte"] < 0.5 * tiny["text"]["code"]["bits_per_byte"]
    rep = first["routing_report"]["tiny"]
    assert set(rep["texts"]) == {"code", "prose", "task:math", "task:all"}  # each text, each task tag
    assert 0 < rep["texts"]["code"]["entropy_vs_uniform"] <= 1
    assert rep["texts"]["code"]["tokens"] == tiny["text"]["code"]["tokens"]
    assert "code / prose" in rep["top_expert_overlap"] and set(rep["cache"]["code"]) == {"0.25", "0.5"}
    # deterministic: the same numbers again
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    for a, b in zip(first["models"], again["models"]):
        assert a["text"] == b["text"] and a["tasks"] == b["tasks"] and a.get("routing") == b.get("routing")


@pytest.mark.parametrize("args,msg", [
    (["--models", "tiny", "--text", "missing.txt"], "neither a file nor a built-in domain"),
    (["--models", "tiny", "--window", "1"], "--window must be >= 2"),
    (["--models", "tiny", "--budgets", "2"], "--budgets"),
    (["--models", "tiny", "--hardware", "nope"], "unknown hardware profile"),
    (["--models", "tiny", "--utilization", "0"], "--utilization"),
])
def test_compare_errors(capsys, args, msg):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err, err
