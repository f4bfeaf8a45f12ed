"""Dual SimVQ codebook: SimVQ formula, hard routing (no gradient / code crosses), usage stats."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import ROOT
from duotok.cluster import kmeans, nearest_code
from duotok.metrics import code_usage
from duotok.quantize import DualCodebook, SimVQBranch, quantizer_from_config


def _zero_or_none(g):
    return g is None or bool(g.abs().sum() == 0)


def test_simvq_formula_matches_reference():
    """Codes = argmin ||z - W E_k||, losses = beta*||z - sg(zq)||^2 and ||sg(z) - zq||^2."""
    br = SimVQBranch(dim=12, code_dim=6, codebook_size=40, beta=0.25, seed=3)
    h = torch.randn(2, 9, 12)
    out = br(h)
    z = br.proj_in(h)
    lin = br.vq.code_transform
    C = br.vq.frozen_codebook @ lin.weight.T + lin.bias                 # W E + b, (K, d)
    d2 = ((z[..., None, :] - C) ** 2).sum(-1)                        # (B, T, K)
    ids = d2.argmin(-1)
    assert torch.equal(out.ids, ids)
    zq = C[ids]
    assert torch.allclose(out.commit, 0.25 * ((z - zq) ** 2).mean())
    assert torch.allclose(out.codebook, ((z - zq) ** 2).mean())
    assert torch.allclose(out.h_q, br.proj_out(zq), atol=1e-6)         # forward value = proj_out(code)
    # frozen codebook is a buffer, W is learnable
    assert "vq.frozen_codebook" in dict(br.named_buffers())
    assert all("frozen" not in n for n, _ in br.named_parameters())


def test_codebook_loss_trains_W_and_commit_trains_encoder():
    br = SimVQBranch(8, 4, 16, seed=0)
    out = br(torch.randn(2, 5, 8))
    out.codebook.backward(retain_graph=True)
    assert br.vq.code_transform.weight.grad.abs().sum() > 0
    assert _zero_or_none(br.proj_in[1].weight.grad)
    br.zero_grad()
    out.commit.backward()
    assert br.proj_in[1].weight.grad.abs().sum() > 0
    assert _zero_or_none(br.vq.code_transform.weight.grad)


@pytest.mark.parametrize("rot", [False, True])
def test_gradient_estimators(rot):
    br = SimVQBranch(8, 4, 16, rotation_trick=rot, seed=0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    out = br(h)
    out.h_q.pow(2).sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
    if not rot:   # straight-through: dL/dz == dL/dzq exactly
        z = br.proj_in(h.detach()).detach().requires_grad_(True)
        zq, _, _ = br.vq(z)
        zq.sum().backward()
        assert torch.allclose(z.grad, torch.ones_like(z))


def test_chunked_search_matches_library():
    br = SimVQBranch(16, 8, 300, seed=5)
    h = torch.randn(3, 50, 16)
    assert torch.equal(br.encode(h, chunk=17), br(h).ids)
    assert torch.equal(nearest_code(br.proj_in(h), br.codebook, chunk=1), br(h).ids)


def test_deterministic_init_no_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = DualCodebook(16, 8, 64, seed=7)
    b = DualCodebook(16, 8, 64, seed=7)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    c = DualCodebook(16, 8, 64, seed=8)
    assert not torch.equal(a.branches["vocals"].codebook, c.branches["vocals"].codebook)
    # the two tracks have different codebooks
    assert not torch.equal(a.branches["vocals"].codebook, a.branches["acc"].codebook)
    del state


def test_hard_routing_no_gradient_crosses():
    dq = DualCodebook(16, 8, (32, 24), seed=0)
    h = torch.randn(6, 10, 16, requires_grad=True)
    lab = torch.tensor([0, 1, 1, 0, 1, 0])
    out = dq(h, lab)
    # gradient of vocal outputs touches only the vocal branch and vocal inputs
    out.h_q[lab == 0].pow(2).sum().backward()
    for n, p in dq.branches["acc"].named_parameters():
        assert _zero_or_none(p.grad), n
    assert dq.branches["vocals"].proj_in[1].weight.grad.abs().sum() > 0
    assert h.grad[lab == 1].abs().sum() == 0 and h.grad[lab == 0].abs().sum() > 0
    # and the other way round
    dq.zero_grad(); h.grad = None
    out = dq(h, lab)
    (out.h_q[lab == 1].pow(2).sum() + 0 * out.losses["vq/commit"]).backward()
    for n, p in dq.branches["vocals"].named_parameters():
        assert _zero_or_none(p.grad), n
    assert h.grad[lab == 0].abs().sum() == 0


def test_per_track_losses_do_not_cross():
    dq = DualCodebook(16, 8, 32, seed=0)
    h = torch.randn(4, 10, 16)
    lab = torch.tensor([0, 0, 0, 0])
    out = dq(h, lab)
    (out.losses["vq/commit"] + out.losses["vq/codebook"]).backward()
    for n, p in dq.branches["acc"].named_parameters():
        assert _zero_or_none(p.grad), n


def test_hard_routing_no_code_crosses():
    dq = DualCodebook(16, 8, (32, 8), seed=0)
    h = torch.randn(6, 20, 16)
    lab = torch.tensor([0, 1, 1, 0, 1, 0])
    ids = dq(h, lab).ids
    assert ids[lab == 1].max() < 8                       # acc ids live in the acc codebook
    # each item's ids equal its own branch run alone
    assert torch.equal(ids[lab == 0], dq.branches["vocals"](h[lab == 0]).ids)
    assert torch.equal(ids[lab == 1], dq.branches["acc"](h[lab == 1]).ids)
    # scrambling the acc branch leaves vocal items' codes and outputs unchanged
    before = dq(h, lab)
    with torch.no_grad():
        for p in dq.branches["acc"].parameters():
            p.add_(torch.randn_like(p))
    after = dq(h, lab)
    assert torch.equal(before.ids[lab == 0], after.ids[lab == 0])
    assert torch.equal(before.h_q[lab == 0], after.h_q[lab == 0])
    assert not torch.equal(before.h_q[lab == 1], after.h_q[lab == 1])
    # order of items in the batch does not matter
    perm = torch.randperm(6)
    assert torch.equal(dq(h[perm], lab[perm]).ids, after.ids[perm])


def test_bad_labels_and_shapes():
    dq = DualCodebook(16, 8, 32)
    with pytest.raises(ValueError, match="labels must be 0"):
        dq(torch.randn(2, 3, 16), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        dq(torch.randn(3, 3, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        dq(torch.randn(2, 3, 15), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ids must be in"):
        dq.branches["acc"].decode_ids(torch.tensor([[32]]))


def test_usage_stats():
    u = code_usage(torch.cat([torch.tensor([0, 1, 2, 3, 4]), torch.tensor([[0, 1], [2, 3]]).flatten()]), 10)
    assert u.usage == 0.5 and u.used == 5 and u.counts.sum() == 9
    uni = code_usage(torch.arange(64).repeat(3), 64)
    assert abs(uni.perplexity - 64) < 1e-6 and uni.usage == 1.0
    assert code_usage(torch.tensor([], dtype=torch.long), 4).usage == 0.0
    with pytest.raises(ValueError):
        code_usage(torch.tensor([4]), 4)


def test_simvq_learns_without_nan():
    """Training through the quantizer on clustered data: reconstruction improves, no NaN, codes used."""
    g = torch.Generator().manual_seed(0)
    dq = DualCodebook(8, 4, 16, seed=0)
    centres = torch.randn(16, 8, generator=g)
    opt = torch.optim.Adam(dq.parameters(), lr=3e-3)
    recs = []
    for step in range(240):
        x = centres[torch.randint(0, 16, (8, 16), generator=g)] + 0.05 * torch.randn(8, 16, 8, generator=g)
        out = dq(x, torch.tensor([0, 1] * 4))
        rec = F.mse_loss(out.h_q, x)
        loss = out.losses["vq/commit"] + out.losses["vq/codebook"] + rec
        assert torch.isfinite(loss), step
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(dq.parameters(), 1.0)
        opt.step()
        recs.append(rec.item())
    assert sum(recs[-20:]) / 20 < 0.75 * sum(recs[:20]) / 20
    ids = dq.encode(centres[None].repeat(2, 1, 1), torch.tensor([0, 1]))
    assert code_usage(ids[0], 16).usage >= 0.5


def test_data_init_matches_feature_statistics_and_raises_usage():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g)
    h = (torch.randn(4, 500, 16, generator=g) @ A) + 5.0
    lab = torch.tensor([0, 0, 1, 1])
    dq = DualCodebook(16, 8, 256, seed=0)
    before = code_usage(dq.encode(h, lab)[:2], 256).usage
    dq.init_from_data(h, lab)
    br = dq.branches["vocals"]
    z = br.proj_in(h[:2]).reshape(-1, 8).detach()
    C = br.codebook.detach()
    assert torch.allclose(C.mean(0), z.mean(0), atol=0.3 * float(z.std(0).mean()))
    assert torch.allclose(C.std(0), z.std(0), rtol=0.25)
    after = code_usage(dq.encode(h, lab)[:2], 256).usage
    assert after > 0.8 and after > before
    # the acc branch was fitted to the acc items only
    assert not torch.equal(dq.branches["acc"].codebook, br.codebook)


def test_paper_profile_codebooks():
    """params/paper.yaml: 2 x 32768 codes at 25 Hz = 0.75 kbps; the code dimension is the stage-2 bottleneck dim
    (read from the finetune checkpoint, never a codebook param)."""
    from duotok.config import checkpoint_config, load_params
    p = load_params(ROOT / "params.yaml", profile=ROOT / "params/paper.yaml")
    assert p.audio.codebook_size == 32768 and p.audio.token_rate == 25 and p.audio.kbps == 0.75
    assert not hasattr(p.codebook, "code_dim")
    dq = quantizer_from_config(checkpoint_config("codebook", p.codebook, p.audio, encoder=p.ssl.encoder,
                                                 code_dim=p.finetune.bottleneck_dim))
    assert dq.codebook_sizes == (32768, 32768)
    assert dq.branches["acc"].codebook.shape == (32768, p.finetune.bottleneck_dim)
    h = torch.randn(1, 30, p.ssl.encoder.width)
    ids = dq.encode(h, torch.tensor([1]), chunk=7)
    assert ids.shape == (1, 30) and torch.equal(ids, dq(h, torch.tensor([1])).ids)


def test_default_profile_codebook_section():
    from duotok.config import load_params
    p = load_params(ROOT / "params.yaml")
    assert p.audio.codebook_size >= 256 and set(p.codebook.lambdas) >= {"vq/commit", "vq/codebook"}


def test_mlp_transform_starts_as_kmeans_codebook():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 16, generator=g) * torch.tensor([4.0] * 2 + [0.05] * 14)   # clustered, ~rank 2
    h = centres[torch.randint(0, 30, (6, 200), generator=g)] + 0.01 * torch.randn(6, 200, 16, generator=g)
    lab = torch.zeros(6, dtype=torch.long)
    used = {}
    for tf in ("linear", "mlp"):
        dq = DualCodebook(16, 16, 32, seed=0, transform=tf)
        dq.init_from_data(h, lab)
        used[tf] = code_usage(dq.encode(h, lab), 32).usage
    assert used["mlp"] >= 0.9 > used["linear"], used
    # deterministic: same seed, same data -> same codebook
    a, b = DualCodebook(16, 16, 32, seed=0, transform="mlp"), DualCodebook(16, 16, 32, seed=0, transform="mlp")
    a.init_from_data(h, lab); b.init_from_data(h, lab)
    assert torch.equal(a.branches["vocals"].codebook, b.branches["vocals"].codebook)
    # the transform keeps training through the codebook loss
    out = a(h, lab)
    out.losses["vq/codebook"].backward()
    assert a.branches["vocals"].vq.code_transform[0].weight.grad.abs().sum() > 0
    c = kmeans(h.reshape(-1, 16), 30, generator=torch.Generator().manual_seed(1))
    assert c.shape == (30, 16)
