import torch

from chx.models.ml_decoder import MLDecoder


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(in_dim=12, num_classes=5, dim=16, heads=4, ffn_dim=32, dropout=0.1)
    return MLDecoder(**{**args, **kw})


def test_output_shape_for_map_and_tokens():
    m = _decoder()
    assert m(torch.randn(3, 12, 4, 5)).shape == (3, 5)
    assert m(torch.randn(3, 7, 12)).shape == (3, 5)


def test_queries_are_a_saved_buffer_not_trained():
    m = _decoder()
    assert all(p is not m.queries for p in m.parameters())
    assert "queries" in m.state_dict()
    assert m.queries.shape == (5, 16)
    assert not m.queries.requires_grad


def test_key_padding_mask_ignores_masked_tokens():
    m = _decoder().eval()
    tokens = torch.randn(2, 6, 12)
    garbage = 100 * torch.randn(2, 3, 12)
    padded = torch.cat([tokens, garbage], dim=1)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad():
        torch.testing.assert_close(m(padded, key_padding_mask=mask), m(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(padded), m(tokens), atol=1e-3)  # the mask is what hides them


def test_prediction_independent_of_batch_mates():
    m = _decoder().eval()
    x = torch.randn(4, 12, 3, 3)
    with torch.no_grad():
        alone = m(x[1:2])
        in_batch = m(x)[1:2]
        other_batch = m(torch.cat([x[1:2], 5 * torch.randn(3, 12, 3, 3)]))[:1]
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_batch, alone, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_gives_identical_output():
    m = _decoder().eval()
    torch.manual_seed(123)  # a different seed: a different random init and different queries
    clone = MLDecoder(12, 5, dim=16, heads=4, ffn_dim=32, dropout=0.1).eval()
    x = torch.randn(2, 12, 3, 4)
    assert not torch.equal(clone.queries, m.queries)
    clone.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(x), m(x))


def test_group_fc_einsum_equals_per_class_linears():
    m = _decoder().eval()
    x = torch.randn(2, 12, 3, 3)
    captured = {}
    m.norm2.register_forward_hook(lambda mod, inp, out: captured.setdefault("h", out))
    with torch.no_grad():
        logits = m(x)
        h = captured["h"]                                   # [B, K, D], the decoded queries
        loop = torch.stack([torch.nn.functional.linear(h[:, k], m.group_weight[k:k + 1], m.group_bias[k:k + 1])
                            [:, 0] for k in range(m.num_classes)], dim=1)
    torch.testing.assert_close(logits, loop, rtol=1e-5, atol=1e-6)


def test_map_input_gets_positional_encoding():
    m = _decoder().eval()
    no_pe = _decoder(pos_enc=False).eval()
    no_pe.load_state_dict(m.state_dict())
    x = torch.randn(1, 12, 3, 3)
    x_perm = x.flatten(2)[:, :, torch.randperm(9, generator=torch.Generator().manual_seed(0))].reshape(1, 12, 3, 3)
    with torch.no_grad():
        # without pos-enc, attention is permutation-invariant over positions; with it, not
        torch.testing.assert_close(no_pe(x_perm), no_pe(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(x_perm), m(x), atol=1e-4)


def _randomize(m: MLDecoder, seed: int = 3) -> MLDecoder:
    """Non-trivial LayerNorm affines and biases, so a swapped or skipped norm cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _original_forward(m: MLDecoder, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The ML-Decoder head as its authors publish it (Ridnik et al.), in eval mode, transcribed in
    plain torch with the original's sequence-first layout, no positional encoding and a per-class
    loop for the group FC; the weights are ``m``'s, by role."""
    F = torch.nn.functional
    tokens = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x                     # [B, N, C]
    memory = F.relu(F.linear(tokens, m.embed.weight, m.embed.bias)).transpose(0, 1)  # [N, B, D]
    b, d = memory.shape[1], m.dim
    tgt = m.queries.unsqueeze(1).expand(-1, b, -1)                                   # [K, B, D]
    tgt = tgt + tgt                                      # tgt + dropout1(tgt), dropout off in eval
    tgt = F.layer_norm(tgt, (d,), m.query_norm.weight, m.query_norm.bias)           # norm1
    attn = m.cross_attn
    tgt2 = F.multi_head_attention_forward(
        tgt, memory, memory, d, heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False,
        0.0, attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False)[0]
    tgt = F.layer_norm(tgt + tgt2, (d,), m.norm1.weight, m.norm1.bias)              # norm2
    lin1, lin2 = m.ffn[0], m.ffn[3]
    tgt2 = F.linear(F.relu(F.linear(tgt, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    tgt = F.layer_norm(tgt + tgt2, (d,), m.norm2.weight, m.norm2.bias)              # norm3
    h = tgt.transpose(0, 1)                                                          # [B, K, D]
    out = torch.zeros(b, m.num_classes)
    for i in range(m.num_classes):                                                   # group FC
        out[:, i] = h[:, i] @ m.group_weight[i]
    return out + m.group_bias


def test_matches_the_original_decoder_layer_on_map_and_token_input():
    m = _randomize(_decoder(pos_enc=False)).eval()      # the original head has no positional encoding
    fmap, tokens = torch.randn(3, 12, 4, 5), torch.randn(3, 7, 12)
    with torch.no_grad():
        for x in (fmap, tokens):
            assert (m(x) - _original_forward(m, x, heads=4)).abs().max() < 1e-5


def test_query_norm_adds_two_d_parameters_and_old_configs_skip_it():
    new, old = _decoder(), _decoder(query_norm=False)
    extra = sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in old.parameters())
    assert extra == 2 * 16
    assert old.query_norm is None and not any(k.startswith("query_") for k in old.state_dict())


def test_query_dropout_draws_a_mask_per_sample_in_training():
    m = _decoder(dropout=0.5).train()
    seen = []
    hook = m.query_norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]) and None)
    torch.manual_seed(0)
    m(torch.randn(4, 7, 12))
    hook.remove()
    ratio = seen[0] / m.queries                      # q + dropout(q): 1 where dropped, 1 + 1/(1-p) kept
    kept = torch.isclose(ratio, torch.tensor(3.0))
    assert (torch.isclose(ratio, torch.tensor(1.0)) | kept).all()
    assert 0 < kept.float().mean() < 1
    assert not torch.equal(kept[0], kept[1])             # each sample its own mask
    with torch.no_grad():
        m.eval()
        x = torch.randn(2, 7, 12)
        assert torch.equal(m(x), m(x))
