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
