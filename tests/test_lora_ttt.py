"""Per-document LoRA TTT and phased global SGD (issue 16): equal to sliding-window eval when it
cannot learn, a document's score independent of the documents before it, score-first per position
(the audit catches either trainer rigged to read ahead), every target scored once, and
2 processes equal 1."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, load_script
from test_eval import FakeSP, V, small_h

L = 32


@pytest.fixture(scope="module")
def setup():
    gpt = load_script("train_gpt.py")
    h = small_h(gpt)
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return gpt, model, luts


def lora_h(gpt, **kw):
    base = {
        "ttt_lora_chunk": 8,
        "ttt_lora_batch_docs": 3,
        "ttt_lora_rank": 4,
        "ttt_lora_lr": 0.01,
        "ttt_phases": "2,4",
        "ttt_phase_lr": 0.05,
        "ttt_batch_seqs": 2,
    }
    return small_h(gpt, **{**base, **kw})


def make_docs(lengths, seed=5):
    """Documents of the given lengths, each BOS + random tokens."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(4, V, (n,), generator=gen)
        d[0] = 1
        docs.append(d)
    return docs


def stream(docs):
    """The val stream: the documents, then a closing BOS so that every document ends
    by predicting it."""
    return torch.cat([*docs, torch.ones(1, dtype=torch.int64)])


DOCS = make_docs([30, 45, 2, 70, 9, 61, 25, 40])


def test_lr_zero_equals_sliding_exactly_where_the_windows_coincide(setup):
    """One document, chunk = stride = window and N - 1 a multiple of it: every chunk's forward is
    the sliding eval's window, token for token, and B = 0 adds exactly nothing."""
    gpt, model, luts = setup
    tokens = make_docs([3 * L + 1])[0]
    h = lora_h(gpt, ttt_lora_lr=0.0, ttt_lora_chunk=L, eval_stride=L)
    sliding = gpt.eval_val_sliding(h, model, tokens, luts)
    for mode in ("ttt_lora", "ttt_phased"):
        res = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)
        assert res["score_first"]["updates"] == 3 and res["score_first"]["passed"]
        assert res["val_loss"] == sliding["val_loss"] and res["bytes"] == sliding["bytes"]


def reference_per_document(model, tokens, L, C):
    """Each target j scored with the tokens of its own document before it, from L tokens before the
    last target of its C-token chunk (a document's chunks count from its first target; a document
    runs from its BOS to the next BOS, its last target)."""
    nll = 0.0
    bos = [i for i in range(tokens.numel()) if tokens[i] == 1]
    ends = [*bos[1:], tokens.numel() - 1]
    for start, end in zip(bos, ends):
        for j in range(start + 1, end + 1):
            last = min(start + 1 + ((j - start - 1) // C + 1) * C - 1, end)
            lo = max(start, last - L)
            with torch.no_grad():
                logits = model.forward_logits(tokens[lo:j][None])[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[tokens[j]].item()
    return nll / (tokens.numel() - 1)


def test_lr_zero_equals_an_independent_per_document_reference(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    res = gpt.eval_val_ttt_lora(lora_h(gpt, ttt_lora_lr=0.0), model, tokens, luts)
    assert res["tokens"] == tokens.numel() - 1 and res["docs"] == len(DOCS)
    assert res["val_loss"] == pytest.approx(reference_per_document(model, tokens, L, 8), rel=1e-6)


def test_lora_learns_and_leaves_the_model_untouched(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    before = [p.clone() for p in model.parameters()]
    still = gpt.eval_val_ttt_lora(lora_h(gpt, ttt_lora_lr=0.0), model, tokens, luts)
    for mode in ("ttt_lora", "ttt_phased"):
        res = gpt.EVAL_MODES[mode].evaluate(lora_h(gpt), model, tokens, luts)
        assert res["score_first"]["passed"] and res["val_loss"] != still["val_loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_a_documents_score_does_not_depend_on_the_documents_before_it(setup):
    gpt, model, luts = setup
    h = lora_h(gpt, ttt_lora_lr=0.05)
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    first = {}
    second = {}
    gpt.eval_val_ttt_lora(h, model, stream(DOCS), luts, doc_scores=first)
    gpt.eval_val_ttt_lora(h, model, stream([DOCS[i] for i in order]), luts, doc_scores=second)
    assert len(first) == len(DOCS)
    for new, old in enumerate(order):
        assert second[new] == pytest.approx(first[old], rel=1e-5, abs=1e-6)
    # and the phases do make it depend on them: the test can tell
    phased = {}
    gpt.eval_val_ttt_phased(h, model, stream(DOCS), luts, doc_scores=phased)
    assert any(abs(phased[i] - first[i]) > 1e-4 for i in range(4, len(DOCS)))


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_every_target_is_scored_once_and_a_duplicated_document_is_caught(setup, monkeypatch, mode):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    audit = gpt.EVAL_MODES[mode].evaluate(lora_h(gpt), model, tokens, luts)["score_first"]
    assert audit["passed"] and audit["scored_twice"] == 0 and audit["never_scored"] == 0
    shipped = gpt.val_documents
    monkeypatch.setattr(gpt, "val_documents", lambda t, bos_id=1: np.concatenate([shipped(t)] * 2))
    audit = gpt.EVAL_MODES[mode].evaluate(lora_h(gpt), model, tokens, luts)["score_first"]
    assert not audit["passed"] and audit["scored_twice"] == tokens.numel() - 1


def read_one_chunk_ahead(gpt, monkeypatch, tokens):
    """Rig the per-document LoRA trainer to read 8 positions past each chunk it trains on."""
    shipped = gpt.ttt_lora_span

    def one_chunk_ahead(doc_lo, first, last, window):
        lo, hi = shipped(doc_lo, first, last, window)
        return lo, min(hi + 8, tokens.numel())

    monkeypatch.setattr(gpt, "ttt_lora_span", one_chunk_ahead)


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_a_lora_trainer_reading_one_chunk_ahead_is_caught(setup, monkeypatch, mode):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    read_one_chunk_ahead(gpt, monkeypatch, tokens)
    audit = gpt.EVAL_MODES[mode].evaluate(lora_h(gpt), model, tokens, luts)["score_first"]
    assert not audit["passed"] and audit["scored_twice"] == 0
    assert any("positions before they were scored" in f for f in audit["failures"])


def test_a_phase_trainer_reading_the_next_phase_is_caught(setup, monkeypatch):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    h = lora_h(gpt)
    assert gpt.eval_val_ttt_phased(h, model, tokens, luts)["score_first"]["passed"]
    shipped = gpt.ttt_phase_pieces

    def into_the_next_phase(docs, ids, ends_at_bos):
        pieces = shipped(docs, ids, ends_at_bos)
        lo, hi = pieces[-1]
        return [*pieces[:-1], (lo, min(hi + L, tokens.numel()))]

    monkeypatch.setattr(gpt, "ttt_phase_pieces", into_the_next_phase)
    audit = gpt.eval_val_ttt_phased(h, model, tokens, luts)["score_first"]
    assert not audit["passed"]
    assert any("on chunk phase" in f and "before they were scored" in f for f in audit["failures"])


def test_the_knobs_are_validated(setup):
    gpt = setup[0]
    for kw, match in (
        ({"ttt_phases": "5,3"}, "TTT_PHASES"),
        ({"ttt_lora_rank": 0}, "TTT_LORA_RANK"),
        ({"ttt_lora_beta2": 1.0}, "TTT_LORA_BETA2"),
        ({"ttt_phases": "a"}, "TTT_PHASES"),
    ):
        with pytest.raises(ValueError, match=match):
            lora_h(gpt, **kw)
    record = gpt.Hyperparameters.from_env({})
    assert record.eval_mode == "ttt_phased" and record.ttt_lora_rank == 80
    assert gpt.EVAL_MODES["ttt_phased"].label == "quantized_ttt_phased"


WORKER = """
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import load_script
from test_eval import FakeSP, V, small_h
from test_lora_ttt import DOCS, lora_h, stream
if "RANK" in os.environ:
    dist.init_process_group("gloo")
gpt = load_script("train_gpt.py")
h = lora_h(gpt, ttt_doc_order=os.environ["TTT_DOC_ORDER"])
torch.manual_seed(0)
model = gpt.build_model(h).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
res = gpt.eval_val_ttt_phased(h, model, stream(DOCS), luts)
if not dist.is_initialized() or dist.get_rank() == 0:
    keys = ("val_loss", "tokens", "bytes", "score_first")
    print("RESULT " + json.dumps({{k: res[k] for k in keys}}))
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
# The result is out: leave without the interpreter's teardown, where a gloo rank on a loaded CPU
# now and then aborts ("terminate called without an active exception", SIGABRT) after its work.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("order", ["stream", "length"])
def test_two_gloo_processes_equal_one(tmp_path, order):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TTT_DOC_ORDER": order}
    runs = []
    for cmd in (
        [sys.executable, str(script)],
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ],
    ):
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-2000:]
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
        runs.append(json.loads(line[len("RESULT ") :]))
    one, two = runs
    assert one["tokens"] == two["tokens"] and one["bytes"] == two["bytes"]
    assert one["score_first"]["passed"] and two["score_first"]["passed"], two["score_first"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert math.isfinite(one["val_loss"])
