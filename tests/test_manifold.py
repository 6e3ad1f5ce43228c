"""train_manifold.py: masked sparsemax, causal routing, the manifold build (train shards only,
deterministic) and the manifold tables in the artifact. The generic contract tests
(test_train_gpt.py, test_eval.py, test_shared_blocks.py) also run on this script."""

import hashlib
import os

import numpy as np
import pytest
import torch
from conftest import TINY_ENV, load_script
from torch import nn

V = 64
SMALL = {
    **TINY_ENV,
    "VOCAB_SIZE": str(V),
    "MODEL_DIM": "32",
    "MANIFOLD_MODES": "16",
    "MANIFOLD_COORDS": "4",
    "ROUTE_TOPK": "8",
    "MANIFOLD_PHYSICS_STEPS": "5",
    "MANIFOLD_PHYSICS_DIM": "16",
    "MANIFOLD_PAIRS": "400",
    "EVAL_SEQ_LEN": "128",
}


@pytest.fixture(scope="module")
def mf():
    return load_script("train_manifold.py")


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny dataset with structure (a noisy Markov chain over V tokens):
    one train and one val shard."""
    root = tmp_path_factory.mktemp("mfdata")
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, V, size=(V, 3))
    tokens = [1]
    for _ in range(30000):
        tokens.append(
            int(nxt[tokens[-1], rng.integers(0, 3)])
            if rng.random() < 0.8
            else int(rng.integers(0, V))
        )
    write_shard(root / "fineweb_train_000000.bin", tokens)
    write_shard(root / "fineweb_val_000000.bin", tokens[:5000])
    return str(root)


def small_h(mf, shards, **kw):
    return mf.Hyperparameters.from_env(
        {**SMALL, "DATA_PATH": shards, **{k.upper(): str(v) for k, v in kw.items()}}
    )


def prepared_model(mf, h, noise=0.05):
    torch.manual_seed(0)
    model = mf.build_model(h)
    model.prepare_training(h, mf.setup_runtime({}), mf.RunLogger("", "t", enabled=False))
    with torch.no_grad():  # wake every zero-initialized path so the audit sees all of them
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * noise)
        for cell in model.cells:
            cell.nb_gate.fill_(0.0)
    return model


# --- masked sparsemax and routing -----------------------------------------------------------------


def test_sparsemax_rows_sum_to_one_and_masked_entries_are_exactly_zero(mf):
    z = torch.randn(50, 9, generator=torch.Generator().manual_seed(0)) * 3
    mask = torch.rand(50, 9, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[:, 0] = False  # the always-valid candidate
    p = mf.sparsemax(z.masked_fill(mask, float("-inf")))
    assert torch.allclose(p.sum(-1), torch.ones(50), atol=1e-6)
    assert (p[mask] == 0).all() and (p >= 0).all()


def test_sparsemax_of_a_single_valid_entry_is_one_hot(mf):
    z = torch.full((3, 6), float("-inf"))
    z[0, 2], z[1, 0], z[2, 5] = 7.0, -100.0, 0.0
    assert torch.equal(
        mf.sparsemax(z), torch.nn.functional.one_hot(torch.tensor([2, 0, 5]), 6).float()
    )


def test_sparsemax_gradient_is_zero_on_masked_entries(mf):
    z = torch.tensor([[0.3, 0.1, 5.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[False, False, True, False]])
    (
        mf.sparsemax(z.masked_fill(mask, float("-inf"))) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    ).sum().backward()
    assert z.grad[0, 2] == 0 and torch.isfinite(z.grad).all()


def test_routing_row_with_no_past_keeps_its_own_token(mf):
    T = 5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    A = mf.route(torch.randn(2, T, T), ~causal, k=3)
    assert torch.allclose(A[:, 0, 0], torch.ones(2)) and (A[:, 0, 1:] == 0).all()
    assert (A[:, ~causal] == 0).all() and torch.allclose(A.sum(-1), torch.ones(2, T))


def test_static_neighbour_candidates_are_past_and_most_recent(mf, shards):
    h = small_h(mf, shards)
    model = mf.build_model(h)
    model.static_nb.zero_()
    model.static_nb[9, 0], model.static_nb[9, 1] = 5, 6  # token 9's neighbours: 5 and 6
    x = torch.tensor([[5, 6, 5, 9, 5, 9, 6]])
    nb = ~model.context(x, torch.zeros(1, 7, 3))["not_nb"][0]
    # latest 6 (pos 1), latest 5 (pos 2), itself
    assert nb[3].nonzero().flatten().tolist() == [1, 2, 3]
    assert nb[5].nonzero().flatten().tolist() == [1, 4, 5]
    assert not nb.triu(1).any()


def test_velocity_weights_favour_recent_tokens(mf, shards):
    model = mf.build_model(small_h(mf, shards, velocity_tau=2.0))
    scn = torch.eye(6)[None]  # token j sits on axis j: vel_i = e_i - sum_j w_ij e_j
    vel = model.context(torch.zeros(1, 6, dtype=torch.long), scn)["vel"][0]
    assert (vel[0] == 0).all()
    assert -vel[5, 4] > -vel[5, 3] > -vel[5, 0] > 0 and (vel[5, :5].sum() + 1).abs() < 1e-6


# --- causality ------------------------------------------------------------------------------------


def test_audit_passes_on_the_prepared_model_at_train_and_eval_lengths(mf, shards):
    h = small_h(mf, shards)
    model = prepared_model(mf, h)
    for length in (h.train_seq_len, h.eval_len):
        result = mf.audit_causality(model, length, V)
        assert result["passed"], (length, result["failures"])


class SeedRouter(nn.Module):
    """PR #663's router: the future AND the token itself masked with -1e4, plain sparsemax over the
    whole row, scores clamped to [-50, 50] after the mask. Row 0 is fully masked, so it averages
    the whole window."""

    def __init__(self, mf):
        super().__init__()
        self.sparsemax = mf.sparsemax
        self.tok_emb = nn.Embedding(V, 16)
        self.q, self.k, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, V)

    def forward_logits(self, ids):
        x = self.tok_emb(ids)
        T = ids.size(1)
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(), -1e4).clamp(-50, 50)
        return self.head(x + self.sparsemax(scores) @ x)


def test_audit_catches_the_seed_router(mf):
    torch.manual_seed(0)
    result = mf.audit_causality(SeedRouter(mf), 64, V)
    assert not result["passed"] and any("position 0" in f for f in result["failures"])


# --- the manifold build ---------------------------------------------------------------------------


def test_manifold_build_reads_train_shards_only(mf, shards, monkeypatch):
    opened, real = [], mf.load_data_shard
    monkeypatch.setattr(
        mf, "load_data_shard", lambda p: opened.append(os.path.basename(p)) or real(p)
    )
    model = prepared_model(mf, small_h(mf, shards), noise=0.0)
    assert opened == ["fineweb_train_000000.bin"]
    assert model.sc_emb.weight.abs().sum() > 0 and model.static_nb.max() > 0


def test_manifold_build_refuses_a_val_shard_in_the_train_list(mf, shards, monkeypatch):
    real = mf.shard_files
    monkeypatch.setattr(mf, "shard_files", lambda path, split: real(path, "val"))
    with pytest.raises(RuntimeError, match="validation shard"):
        prepared_model(mf, small_h(mf, shards))


def test_manifold_build_is_deterministic(mf, shards):
    h = small_h(mf, shards)
    tokens = mf.load_data_shard(os.path.join(shards, "fineweb_train_000000.bin"))

    def digest():
        sc, nb, _ = mf.build_manifold(mf.count_cooccurrence([tokens], V, torch.device("cpu")), h)
        return hashlib.sha256(sc.numpy().tobytes()).hexdigest(), hashlib.sha256(
            nb.numpy().tobytes()
        ).hexdigest()

    assert digest() == digest()


def test_artifact_roundtrip_restores_the_manifold(mf, shards, tmp_path):
    h = small_h(mf, shards)
    model = prepared_model(mf, h)
    mf.save_artifact(model, h, str(tmp_path / "m.pga"))
    loaded, _ = mf.load_artifact(str(tmp_path / "m.pga"))
    assert torch.equal(loaded.static_nb, model.static_nb)
    sc, back = model.sc_emb.weight, loaded.sc_emb.weight
    assert not back.requires_grad and back.abs().sum() > 0
    assert ((back - sc).abs() <= sc.abs().amax(1, keepdim=True) / 127 + 1e-6).all()  # int8 per row


def test_frozen_manifold_is_in_no_optimizer_group(mf, shards):
    h = small_h(mf, shards)
    model = mf.build_model(h)
    matrices, groups = mf.param_groups(model, h)
    grouped = {id(p) for p in matrices} | {id(p) for g in groups for p in g["params"]}
    assert id(model.sc_emb.weight) not in grouped
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
