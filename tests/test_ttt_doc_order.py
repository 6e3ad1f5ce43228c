"""TTT_DOC_ORDER (#2135's scoring order): with `length` the LoRA TTT evals score the longest
documents first, a TTT_PHASES prefix is the longest documents, and the phase SGD trains on
exactly those, shortest first, read as one stream of pieces of the val split. Score-first holds
per position: a phase trainer rigged to read a document not yet scored is caught."""

import numpy as np
import pytest
import torch
from test_lora_ttt import DOCS, lora_h, make_docs, setup, stream  # noqa: F401 (a fixture)


def lengths_of(docs):
    return docs[:, 2] - docs[:, 1]


def test_length_order_is_longest_first_with_ties_in_file_order(setup):  # noqa: F811
    gpt = setup[0]
    docs = gpt.val_documents(stream(make_docs([5, 9, 5, 9, 2])))
    assert lengths_of(docs).tolist() == [4, 8, 4, 8, 1]
    assert gpt.ttt_doc_order(lora_h(gpt, ttt_doc_order="length"), docs).tolist() == [1, 3, 0, 2, 4]
    assert gpt.ttt_doc_order(lora_h(gpt), docs).tolist() == [0, 1, 2, 3, 4]
    ids = np.array([3, 4, 0])
    length = lora_h(gpt, ttt_doc_order="length")
    assert gpt.ttt_phase_docs(length, docs, ids).tolist() == [4, 0, 3]  # shortest first
    assert gpt.ttt_phase_docs(lora_h(gpt), docs, ids).tolist() == [3, 4, 0]  # as scored


def test_pieces_of_documents_in_file_order_are_one_span(setup):  # noqa: F811
    gpt = setup[0]
    tokens = stream(DOCS)
    docs = gpt.val_documents(tokens)
    ends_at_bos = (tokens[docs[:, 2]] == 1).numpy()
    for d0, d1 in ((0, 1), (0, 3), (2, 5), (5, len(docs))):
        pieces = gpt.ttt_phase_pieces(docs, np.arange(d0, d1), ends_at_bos)
        assert pieces == [(int(docs[d0, 0]), int(docs[d1 - 1, 2]) + 1)]


def test_scattered_documents_read_as_one_stream_of_their_own_tokens(setup):  # noqa: F811
    gpt = setup[0]
    tokens = stream(DOCS)
    docs = gpt.val_documents(tokens)
    ends_at_bos = (tokens[docs[:, 2]] == 1).numpy()
    ids = np.array([7, 5, 3, 4])  # 7 is the last document: its last target is the closing BOS
    pieces = gpt.ttt_phase_pieces(docs, ids, ends_at_bos)
    # Each document from its BOS, its closing BOS left to the next piece's own; 3 and 4 meet.
    assert pieces == [
        (int(docs[7, 0]), int(docs[7, 2])),
        (int(docs[5, 0]), int(docs[5, 2])),
        (int(docs[3, 0]), int(docs[4, 2]) + 1),
    ]
    view = gpt.RecordedTokens(tokens)
    joined = gpt.PieceView(view, pieces)
    expected = torch.cat([tokens[lo:hi] for lo, hi in pieces])
    assert len(joined) == expected.numel()
    assert (joined.read(0, len(joined)) == expected).all()
    view.take_reads()
    cut = pieces[0][1] - pieces[0][0]
    assert (joined.read(cut - 3, cut + 4) == expected[cut - 3 : cut + 4]).all()
    # The reads recorded are the val positions on either side of the cut, nothing between.
    assert view._spans == [(pieces[0][1] - 3, pieces[0][1]), (pieces[1][0], pieces[1][0] + 4)]
    with pytest.raises(IndexError, match="phase tokens"):
        joined.read(0, len(joined) + 1)
    # Every BOS the stream holds starts a document: no document's closing BOS doubles the next's.
    bos = (expected == 1).nonzero().flatten().tolist()
    assert all(b + 1 not in bos for b in bos)


def phased(gpt, model, luts, monkeypatch, **kw):
    """ttt_phased on DOCS, with the pieces of each pause recorded."""
    pauses = []
    shipped = gpt.ttt_phase_pieces

    def recorded(docs, ids, ends_at_bos):
        pieces = shipped(docs, ids, ends_at_bos)
        pauses.append((ids.tolist(), pieces))
        return pieces

    monkeypatch.setattr(gpt, "ttt_phase_pieces", recorded)
    res = gpt.eval_val_ttt_phased(lora_h(gpt, **kw), model, stream(DOCS), luts)
    monkeypatch.setattr(gpt, "ttt_phase_pieces", shipped)
    return res, pauses


def test_length_order_phases_train_on_the_longest_documents(setup, monkeypatch):  # noqa: F811
    gpt, model, luts = setup
    tokens = stream(DOCS)
    docs = gpt.val_documents(tokens)
    by_stream, stream_pauses = phased(gpt, model, luts, monkeypatch)
    by_length, length_pauses = phased(gpt, model, luts, monkeypatch, ttt_doc_order="length")
    assert by_length["doc_order"] == "length" and by_stream["doc_order"] == "stream"
    for res in (by_stream, by_length):
        assert res["score_first"]["passed"], res["score_first"]
        assert res["score_first"]["targets"] == tokens.numel() - 1
        assert res["score_first"]["scored_twice"] == res["score_first"]["never_scored"] == 0
        assert res["phases"] == 2
    # TTT_PHASES "2,4": the first pause trains on the first two documents, the second on the next
    # two; in file order those are documents 0-1 and 2-3, by length the four longest.
    assert [ids for ids, _ in stream_pauses] == [[0, 1], [2, 3]]
    longest = np.argsort(-lengths_of(docs), kind="stable")
    assert sorted(longest[:4].tolist()) == [1, 3, 5, 7]
    first, second = (ids for ids, _ in length_pauses)
    assert first == [5, 3] and second == [7, 1]  # each pause shortest first
    assert length_pauses[0][1] == [
        (int(docs[5, 0]), int(docs[5, 2])),
        (int(docs[3, 0]), int(docs[3, 2]) + 1),
    ]
    # The same targets and bytes are scored once either way; the adapted base differs.
    assert by_length["tokens"] == by_stream["tokens"] and by_length["bytes"] == by_stream["bytes"]
    assert by_length["val_loss"] != by_stream["val_loss"]


def test_a_length_order_phase_reading_an_unscored_document_is_caught(
    setup,  # noqa: F811
    monkeypatch,
):
    """A rig that puts the shortest document, scored last, first in the first phase's SGD."""
    gpt, model, luts = setup
    h = lora_h(gpt, ttt_doc_order="length")
    tokens = stream(DOCS)
    assert gpt.eval_val_ttt_phased(h, model, tokens, luts)["score_first"]["passed"]
    shipped = gpt.ttt_phase_docs
    shortest = int(np.argmin(lengths_of(gpt.val_documents(tokens))))

    def with_an_unscored_document(h, docs, ids):
        return np.insert(shipped(h, docs, ids), 0, shortest)

    monkeypatch.setattr(gpt, "ttt_phase_docs", with_an_unscored_document)
    audit = gpt.eval_val_ttt_phased(h, model, tokens, luts)["score_first"]
    assert not audit["passed"]
    assert any("on chunk phase" in f and "before they were scored" in f for f in audit["failures"])


def test_the_order_is_validated(setup):  # noqa: F811
    gpt = setup[0]
    with pytest.raises(ValueError, match="TTT_DOC_ORDER"):
        lora_h(gpt, ttt_doc_order="random")
    assert gpt.Hyperparameters.from_env({"PRESET": "record"}).ttt_doc_order == "length"
    assert gpt.Hyperparameters.from_env({"PRESET": "record_1855"}).ttt_doc_order == "stream"
