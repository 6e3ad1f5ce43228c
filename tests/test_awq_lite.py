"""AWQ-lite (#1945): the most salient column group of the model's GPTQ matrices rounded at int8
inside the GPTQ loop. Against a float64 column-by-column reference, the choice against the
saliency computed by hand, the error it removes on a constructed layer, and the artifact: written,
read back and dequantized exactly; malformed groups refused."""

import json

import numpy as np
import pytest
import reference_quant as ref
import torch
from conftest import REPO, TINY_ENV


def hparams(gpt, **overrides):
    return gpt.Hyperparameters.from_env(
        {**TINY_ENV, **{k.upper(): str(v) for k, v in overrides.items()}}
    )


def layer(seed, rows, cols, tokens=4096, loud=None):
    """A linear layer's weight and the Hessian of correlated inputs; `loud` (a column slice) gets
    activations 8x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols) * 0.5
    X = (torch.randn(tokens, cols, generator=g) * torch.linspace(0.3, 1.5, cols)) @ mix
    if loud is not None:
        X[:, loud] *= 8.0
    W = torch.randn(rows, cols, generator=g) * 0.05
    return X, W, X.T @ X / tokens


def test_gptq_with_an_int8_group_equals_the_column_by_column_reference(gpt):
    X, W, H = layer(seed=5, rows=24, cols=48)
    clip = 3.0 * W.std(dim=1, correction=0)
    starts, size = [16], 8
    q, s, s_hi = gpt.gptq_quantize(W, H, 4, clip, block=16, protect=(starts, size))
    wide = np.zeros(48, dtype=bool)
    wide[16:24] = True
    rq, rs, rs_hi = ref.gptq(W.numpy(), H.numpy(), 4, clip.numpy(), wide=wide, wide_bits=8)
    assert np.array_equal(s.numpy(), rs) and np.array_equal(s_hi.numpy(), rs_hi)
    assert (q.numpy() == rq).mean() > 0.99  # float32 vs float64 may flip a rare tie
    # The group really is finer than int4: its codes leave [-7, 7], the others never do.
    assert int(q[:, 16:24].abs().max()) > 7 and int(q[:, ~torch.from_numpy(wide)].abs().max()) <= 7
    mine = gpt.dequantize_awq(q, s, s_hi, starts, size).numpy()
    theirs = ref.dequantize_rows(rq, rs)
    theirs[:, 16:24] = rq[:, 16:24].astype(np.float32) * rs_hi.astype(np.float32)[:, None]

    def out_err(deq):
        return float(np.linalg.norm(X.numpy() @ (W.numpy() - deq).T))

    assert out_err(mine) == pytest.approx(out_err(theirs), rel=0.02)


def test_the_chosen_groups_are_the_argmax_of_the_saliency_over_the_model(gpt):
    state = {}
    hessians = {}
    for k, seed in enumerate((1, 2, 3)):
        _, W, H = layer(seed, rows=32, cols=64 + 16 * k, tokens=512)
        name = f"blocks.{k}.mlp.fc.weight"
        state[name] = W * (1 + k)
        hessians[name] = H
    # The saliency by hand: per column RMS activation (sqrt of mean x^2 = diag H) x mean |W|,
    # summed over whole groups of 16 columns, ranked over every matrix.
    scores = []
    for name, W in state.items():
        col = np.sqrt(np.diag(hessians[name].numpy())) * np.abs(W.numpy()).mean(0)
        for g in range(W.shape[1] // 16):
            scores.append((col[16 * g : 16 * (g + 1)].sum(), name, 16 * g))
    scores.sort(reverse=True)
    for top_k in (1, 3):
        h = hparams(
            gpt,
            gptq_enabled=1,
            awq_lite_enabled=1,
            awq_lite_group_size=16,
            awq_lite_group_top_k=top_k,
            keep_float_max_numel=0,
            quant_bits=6,
        )
        chosen = gpt.awq_select(state, h, hessians)
        want = {}
        for _, name, start in scores[:top_k]:
            want.setdefault(name, []).append(start)
        assert chosen == {n: sorted(v) for n, v in want.items()}
    # A matrix already at AWQ_LITE_BITS is no candidate.
    h8 = hparams(gpt, gptq_enabled=1, awq_lite_enabled=1, keep_float_max_numel=0, quant_bits=8)
    assert gpt.awq_select(state, h8, hessians) == {}


def test_awq_lowers_the_hessian_weighted_error_where_one_group_is_loud(gpt):
    _, W, H = layer(seed=7, rows=64, cols=128, loud=slice(64, 96))
    h = hparams(
        gpt,
        gptq_enabled=1,
        awq_lite_enabled=1,
        awq_lite_group_size=32,
        keep_float_max_numel=0,
        quant_bits=4,
    )
    name = "blocks.0.mlp.fc.weight"
    assert gpt.awq_select({name: W}, h, {name: H}) == {name: [64]}
    clip = 3.0 * W.std(dim=1, correction=0)

    def weighted_error(w_hat):
        e = W - w_hat
        return float(((e @ H) * e).sum())

    plain = weighted_error(gpt.dequantize_rows(*gpt.gptq_quantize(W, H, 4, clip)))
    q, s, s_hi = gpt.gptq_quantize(W, H, 4, clip, protect=([64], 32))
    awq = weighted_error(gpt.dequantize_awq(q, s, s_hi, [64], 32))
    assert awq < 0.8 * plain, (awq, plain)


def awq_artifact(gpt, tmp_path, **overrides):
    env = dict(
        gptq_enabled=1,
        awq_lite_enabled=1,
        awq_lite_group_size=16,
        awq_lite_group_top_k=3,
        keep_float_max_numel=0,
        quant_bits=5,
        lqer_rank=2,
        lqer_top_k=2,
        compressor="pergroup",
    )
    h = hparams(gpt, **{**env, **overrides})
    torch.manual_seed(0)
    model = gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batches = [torch.randint(0, h.vocab_size, (2, 32)) for _ in range(2)]
    hessians = gpt.collect_hessians(model, batches)
    path = tmp_path / "awq.pga"
    sizes = gpt.save_artifact(model, h, str(path), hessians=hessians)
    return h, model, hessians, path, sizes


def test_an_awq_artifact_reads_back_to_exactly_the_quantized_weights(gpt, tmp_path):
    h, model, hessians, path, sizes = awq_artifact(gpt, tmp_path)
    state = gpt.artifact_state(model)
    chosen = gpt.awq_select(state, h, hessians)
    assert sum(len(v) for v in chosen.values()) == 3
    header, raw = gpt.read_artifact(str(path))
    by_name = {e["name"]: e for e in header["tensors"]}
    for name, starts in chosen.items():
        assert by_name[name]["awq_starts"] == starts and by_name[name]["awq_bits"] == 8
    loaded, _ = gpt.load_artifact(str(path))
    # Independently of the artifact code: GPTQ with the groups, then the residual's LQER.
    for name, t in state.items():
        e = by_name[name]
        if not e["scheme"].startswith("int"):
            continue
        bits = int(e["scheme"][3:])
        clip = gpt.row_clip(t.float(), bits, h, name)
        starts = chosen.get(name)
        if starts:
            q, s, s_hi = gpt.gptq_quantize(t, hessians[name], bits, clip, protect=(starts, 16))
            w_hat = gpt.dequantize_awq(q, s, s_hi, starts, 16)
        elif name in hessians:
            w_hat = gpt.dequantize_rows(*gpt.gptq_quantize(t, hessians[name], bits, clip))
        else:
            w_hat = gpt.dequantize_rows(*gpt.quantize_rows(t, bits, clip))
        if "lqer_rank" in e:
            parts = gpt.lqer_factors(t.float() - w_hat, 2, h.lqer_group)
            w_hat = w_hat + gpt.lqer_product(parts, 2, h.lqer_group, list(t.shape))
        assert torch.equal(loaded.state_dict()[name], w_hat.to(t.dtype)), name
    assert sum("lqer_rank" in e for e in header["tensors"]) == 2
    assert "awq_scale" in {g["name"] for g in sizes["groups"]}


def test_bit_allocation_counts_the_awq_bytes(gpt):
    h_off = hparams(gpt, gptq_enabled=1, keep_float_max_numel=0)
    h_on = hparams(
        gpt, gptq_enabled=1, awq_lite_enabled=1, keep_float_max_numel=0, awq_lite_group_top_k=2
    )
    state = gpt.artifact_state(gpt.build_model(h_off))
    rows = max(t.shape[0] for t in state.values() if t.ndim == 2)
    extra = gpt._fixed_bytes(state, h_on, 0) - gpt._fixed_bytes(state, h_off, 0)
    assert extra == 2 * (64 + 2) * rows


def test_an_artifact_without_groups_still_reads(gpt):
    """The committed example record predates AWQ-lite: it still passes the checks and loads."""
    records = sorted(REPO.glob("records/*/*/*.pga"))
    if not records:
        pytest.skip("no example record")
    header, raw = gpt.read_artifact(str(records[0]))
    assert not any("awq_starts" in e for e in header["tensors"])
    state = gpt.dequantize_entries(header["tensors"], raw)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def forged(gpt, path, tmp_path, change):
    """The artifact with change(entry) applied to its first AWQ entry, checksums recomputed."""
    header, offset = gpt.read_artifact_header(str(path))
    payload = path.read_bytes()[offset:]
    header = json.loads(json.dumps(header))
    header.pop("header_sha256")
    change(next(e for e in header["tensors"] if "awq_starts" in e), header)
    out = tmp_path / "forged.pga"
    gpt.write_artifact(str(out), header, payload)
    return out


@pytest.mark.parametrize(
    "case",
    ["bits_not_wider", "overlap", "past_the_end", "missing_field", "missing_scale", "on_float"],
)
def test_malformed_awq_groups_are_refused(gpt, tmp_path, case):
    _, _, _, path, _ = awq_artifact(gpt, tmp_path, awq_lite_group_top_k=1, lqer_rank=0)

    def change(e, header):
        if case == "bits_not_wider":
            e["awq_bits"] = 5
        elif case == "overlap":
            e["awq_starts"] = [e["awq_starts"][0], e["awq_starts"][0] + 8]
        elif case == "past_the_end":
            e["awq_starts"] = [e["shape"][1] - 8]
        elif case == "missing_field":
            del e["awq_group"]
        elif case == "missing_scale":
            del e["awq_scale"]
        else:
            other = next(t for t in header["tensors"] if t["scheme"] in ("fp16", "fp32"))
            for k in ("awq_bits", "awq_group", "awq_starts"):
                other[k] = e[k]

    words = {
        "bits_not_wider": "awq_bits",
        "overlap": "awq_starts",
        "past_the_end": "awq_starts",
        "missing_field": "awq_group",
        "missing_scale": "awq_scale",
        "on_float": "not int-k",
    }[case]
    with pytest.raises(ValueError, match=words) as info:
        gpt.load_artifact(str(forged(gpt, path, tmp_path, change)))
    assert "\n" not in str(info.value)


def test_bad_awq_settings_are_rejected_naming_the_variable(gpt):
    for env, name in (
        ({"AWQ_LITE_ENABLED": "1"}, "AWQ_LITE_ENABLED"),
        ({"GPTQ_ENABLED": "1", "AWQ_LITE_BITS": "9"}, "AWQ_LITE_BITS"),
        ({"AWQ_LITE_GROUP_SIZE": "0"}, "AWQ_LITE_GROUP_SIZE"),
        ({"AWQ_LITE_GROUP_TOP_K": "0"}, "AWQ_LITE_GROUP_TOP_K"),
    ):
        with pytest.raises(ValueError, match=name):
            gpt.Hyperparameters.from_env({**TINY_ENV, **env})
