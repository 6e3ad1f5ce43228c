"""Hydra-specific behaviour: causality of the chunk codes and the concept memory, the BOS reset, the
stripped training-only heads, the template split, the geometry losses and probes on hand-built
inputs, the schedule."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ENV, load_script

hydra = load_script("train_hydra.py")
R, Q, P, G, M = hydra.GEO_LAYOUT
N = hydra.GEO_ROWS


def tiny(**overrides):
    env = {
        **TINY_ENV,
        "HYDRA_SLOTS": "8",
        "HYDRA_CHUNK": "32",
        **{k.upper(): str(v) for k, v in overrides.items()},
    }
    return hydra.Hyperparameters.from_env(env)


def perturbed_model(h, seed=0):
    """Random non-zero weights everywhere (the memory projections start at zero,
    which would hide leaks)."""
    torch.manual_seed(seed)
    model = hydra.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


class Log:
    def log0(self, msg, console=True):
        self.last = msg


@pytest.fixture(scope="module")
def prepared(embedded):
    h = tiny(**embedded, train_seq_len=128, hydra_aux_every=2)
    torch.manual_seed(0)
    model = hydra.build_model(h)
    model.prepare_training(h, None, Log())
    return h, model


# --- causality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [32, 64])
def test_causality_audit_passes_with_chunk_boundaries(chunk):
    h = tiny(hydra_chunk=chunk, train_seq_len=128)
    result = hydra.audit_causality(perturbed_model(h), 128, h.vocab_size, batch=2, chunk=chunk)
    assert result["passed"], result["failures"]


def test_noise_on_a_chunk_code_changes_nothing_before_the_next_chunk():
    h = tiny(train_seq_len=128)
    model, C = perturbed_model(h), h.hydra_chunk
    x = torch.randint(0, h.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model.forward_logits(x)
        for k in range(128 // C):
            noise = torch.zeros(2, 128 // C, h.hydra_slots, h.hydra_slot_dim)
            noise[:, k] = torch.randn(2, h.hydra_slots, h.hydra_slot_dim)
            moved = (model.forward_logits(x, code_noise=noise) - base).abs().amax(dim=(0, 2))
            assert moved[: (k + 1) * C].max() == 0, k
            if k < 128 // C - 1:
                assert moved[(k + 1) * C :].min() > 0, k


@pytest.mark.parametrize("bos", [64, 70])
def test_bos_resets_the_concept_memory(bos):
    """Memory (and predicted codes) after a BOS do not depend on the previous document's
    tokens or codes."""
    h = tiny(train_seq_len=128)
    model, C = perturbed_model(h), h.hydra_chunk
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, h.vocab_size, (2, 128), generator=gen)
    ids[:, bos] = hydra.BOS_ID
    z = torch.randn(2, 128 // C, h.hydra_slots, h.hydra_slot_dim, generator=gen)
    ids2, z2 = ids.clone(), z.clone()
    ids2[:, :bos] = torch.randint(2, h.vocab_size, (2, bos), generator=gen)
    # every chunk that starts before the BOS
    z2[:, : -(-bos // C)] = torch.randn_like(z2[:, : -(-bos // C)])
    with torch.no_grad():
        (mem, zhat), (mem2, zhat2) = model.memory(z, ids), model.memory(z2, ids2)
    assert torch.equal(mem[:, bos:], mem2[:, bos:])
    assert torch.equal(zhat[:, -(-(bos + 1) // C) :], zhat2[:, -(-(bos + 1) // C) :])
    # before the BOS the memory is live
    assert (mem[:, C:bos] - mem2[:, C:bos]).abs().amax(-1).min() > 0


# --- artifact and heads ---------------------------------------------------------------------------


def test_artifact_holds_no_training_only_head_and_loaded_heads_raise(tmp_path):
    h = tiny()
    model = perturbed_model(h)
    path = tmp_path / "h.pga"
    hydra.save_artifact(model, h, str(path))
    header, _ = hydra.read_artifact_header(str(path))
    names = [e["name"] for e in header["tensors"]]
    assert names and not [n for n in names if n.startswith(model.training_only_prefixes)]
    assert (
        any(n.startswith("pred_") for n in names)
        and "pool.queries" in names
        and "null_code" in names
    )
    loaded, _ = hydra.load_artifact(str(path))
    assert loaded.heads_stripped and not list(loaded.heads.parameters())
    z = torch.randn(3, h.hydra_slots, h.hydra_slot_dim)
    for name in ("recon", "parse", "bow"):
        with pytest.raises(RuntimeError, match="training-only head"):
            loaded.heads[name](z)
    x = torch.randint(0, h.vocab_size, (2, 64))
    with torch.no_grad():
        logits = loaded.forward_logits(x)
    assert logits.shape == (2, 64, h.vocab_size) and torch.isfinite(logits).all()


# --- templates ------------------------------------------------------------------------------------


def test_template_train_and_test_vocabularies_are_disjoint():
    fillers = {
        split: {
            w
            for words in hydra.vocabulary(split).values()
            for pair in words
            for w in pair.split(":")
        }
        for split in ("train", "test")
    }
    assert fillers["train"] and fillers["test"] and not fillers["train"] & fillers["test"]
    rng = random.Random(0)
    for split, other in (("train", "test"), ("test", "train")):
        for _ in range(20):
            sentences = hydra.template_batch(rng, split)
            assert len(sentences) == N
            words = {w for s in sentences for w in s.split()}
            assert not (words | {w[:-1] for w in words if w.endswith("s")}) & fillers[other]


def test_template_layout_pairs_share_a_relation_and_clusters_an_animal():
    sentences = hydra.template_batch(random.Random(1), "train")
    base, swaps = sentences[:R], sentences[R : 2 * R]
    assert all(sorted(a.split()) == sorted(b.split()) and a != b for a, b in zip(base, swaps))
    clusters = [
        sentences[2 * R + 2 * Q * P + g * M : 2 * R + 2 * Q * P + (g + 1) * M] for g in range(G)
    ]
    assert all(len({s.split()[1] for s in c}) == 1 for c in clusters)


# --- losses and probes on hand-built inputs -------------------------------------------------------


def analogy_embeddings():
    """pos_i = (u_i + v) / sqrt2, neg_i = (u_i - v) / sqrt2 with orthonormal u_i, v:
    a - b + c = d exactly."""
    eye = torch.eye(128)
    f = eye[:N].clone()
    v = eye[100]
    for q in range(Q):
        for i in range(P):
            u = eye[60 + q * P + i]
            f[2 * R + 2 * (q * P + i)] = (u + v) / math.sqrt(2)
            f[2 * R + 2 * (q * P + i) + 1] = (u - v) / math.sqrt(2)
    return f


def test_geometry_losses_on_identical_vectors():
    f = torch.zeros(N, 16)
    f[:, 0] = 1.0
    losses = {k: float(v) for k, v in hydra.geometry(f)[0].items()}
    assert losses == pytest.approx(
        {
            "word_order": 0.5,
            "hard_repulsion": 0.9,
            "batch_repulsion": 0.7,
            "analogy": 0.0,
            "direction": 0.8,
            "cluster": 0.8,
        }
    )


def test_geometry_losses_on_orthogonal_vectors():
    losses = {k: float(v) for k, v in hydra.geometry(torch.eye(N))[0].items()}
    assert losses == pytest.approx(
        {
            "word_order": 0.0,
            "hard_repulsion": 0.0,
            "batch_repulsion": 0.0,
            "analogy": 0.9,
            "direction": 0.8,
            "cluster": 0.5,
        }
    )


def test_geometry_losses_and_probes_on_a_known_analogy():
    f = analogy_embeddings()
    losses, probes = hydra.geometry(f)
    assert float(losses["analogy"]) == pytest.approx(0.0) and float(
        losses["direction"]
    ) == pytest.approx(0.0)
    assert float(probes["analogy"]) == pytest.approx(1.0) and float(
        probes["direction"]
    ) == pytest.approx(1.0)
    assert float(probes["analogy_baseline"]) == pytest.approx(0.5)  # cos(c, d) = 0, cos(a, d) = 1/2


def test_probes_on_identical_and_grouped_vectors():
    f = torch.zeros(N, 16)
    f[:, 0] = 1.0
    probes = hydra.geometry(f)[1]
    assert float(probes["word_order"]) == pytest.approx(1.0) and float(
        probes["cluster_gap"]
    ) == pytest.approx(0.0)
    start = 2 * R + 2 * Q * P
    for g in range(G):
        f[start + g * M : start + (g + 1) * M] = F.one_hot(torch.tensor(g + 1), 16).float()
    assert float(hydra.geometry(f)[1]["cluster_gap"]) == pytest.approx(1.0)


def test_effective_rank_counts_components_to_the_variance_threshold():
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    x = torch.cat([a, -a])  # centered; variances 9, 4, 1 -> cumulative 0.643, 0.929, 1.0
    assert hydra.effective_rank(x, 0.90) == 2 and hydra.effective_rank(x, 0.95) == 3
    assert hydra.effective_rank(x, 0.5) == 1


# --- training path and schedule -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["para", "parse"])
def test_aux_step_adds_losses_and_every_parameter_gets_a_gradient(prepared, kind):
    h, model = prepared
    model.train()
    model.aux_on = True
    model.set_kind(kind)
    x = torch.randint(0, h.vocab_size, (2, 128), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        model.aux_on = False
        ce = float(model(x, y))
        model.aux_on = True
    loss = model(x, y)
    assert math.isfinite(loss.item()) and loss.item() > ce
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs all of them
    used = {"para": "heads.bow.", "parse": "heads.parse."}[kind]
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(used))
    assert any(
        p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("heads.recon.")
    )
    stats = dict(zip(hydra.STAT_KEYS, model.stats.tolist()))
    assert 0 <= stats["recon_acc"] <= 1 and stats["geo"] > 0 and stats["pred"] > 0
    model.zero_grad()


def test_schedule_record_cuts_aux_in_warmdown_and_research_keeps_it(prepared):
    h, model = prepared
    model.priming, model.steps = False, 0
    kinds = []
    for step in range(10):
        model.set_training_progress(step / 100)
        kinds.append(model.aux_kind)
    assert [k is not None for k in kinds] == [s % h.hydra_aux_every == 0 for s in range(10)]
    assert float(model.geo_scale) == pytest.approx(0.09 / hydra.GEO_WARMUP)
    model.set_training_progress(0.8)
    assert not model.aux_on and model.aux_kind is None
    model.h = dataclass_replace(h, hydra_mode="research")
    model.set_training_progress(0.8)
    assert model.aux_on
    model.h = dataclass_replace(h, hydra_aux=False)
    model.set_training_progress(0.1)
    assert not model.aux_on
    model.h = h


def dataclass_replace(h, **kw):
    import dataclasses

    return dataclasses.replace(h, **kw)


def test_validation_probes_report_the_dashboard_keys(prepared):
    _, model = prepared
    probes = model.validation_probes()
    for key in (
        "analogy",
        "analogy_baseline",
        "cluster_gap",
        "direction",
        "word_order",
        "rank90",
        "rank95",
        "recon_acc",
        "recon_exact",
        "recon_exact_ema",
    ):
        assert math.isfinite(probes[key]), key
    assert probes["codes"] >= 512 and 1 <= probes["rank90"] <= probes["rank95"] <= 8 * 16
    assert model.training  # restored


def test_structural_classes_and_augmentation_maps_come_from_the_tokenizer(prepared, embedded):
    h, model = prepared
    sp = hydra.load_tokenizer(embedded["TOKENIZER_PATH"], h.vocab_size)
    the, The = sp.piece_to_id("\u2581the"), sp.piece_to_id("\u2581The")
    assert model.flags[the].tolist() == [1, 0, 0, 0, 0, 0] and model.flags[The][3] == 1
    assert int(model.case_map[the]) == The and int(model.case_map[The]) == the
    assert model.flags[sp.piece_to_id("<0x0A>")].tolist() == [0, 0, 0, 0, 1, 1]
    assert int(model.bucket[the]) <= 1 and int(model.bucket.max()) == 7


def test_param_groups_cover_every_parameter_once_and_keep_heads_off_muon():
    h = tiny()
    model = hydra.build_model(h)
    matrices, adam = hydra.param_groups(model, h)
    ids = [id(p) for p in matrices] + [id(p) for g in adam for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    heads = {id(p) for p in model.heads.parameters()}
    assert heads and not heads & {id(p) for p in matrices}
    assert all("lr" in g and "base_lr" in g for g in adam)


def test_warmup_priming_cycles_every_forward_variant_then_resets(prepared):
    """The shared warmup calls the progress hook with 0.0 for its first half
    and 1.0 for the second."""
    h, model = prepared
    model.priming, model.steps, model.last_frac = True, 0, 0.0
    seen = set()
    for frac in (0.0, 0.0, 0.0, 1.0):
        model.set_training_progress(frac)
        seen.add((model.aux_on, model.aux_kind))
    assert seen == {(True, "para"), (True, "parse"), (True, None), (False, None)}
    model.set_training_progress(0.0)
    assert not model.priming and model.steps == 1 and sum(model.aux_counts.values()) == 1
