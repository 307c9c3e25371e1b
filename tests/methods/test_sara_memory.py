"""SaRA's memory (issue 27): the positions of the selected entries cost a byte each, not a 4-byte index."""

from __future__ import annotations

import copy

import pytest
import torch

import difftune as dt
from difftune.methods.sara import SaRAConfig
from difftune.methods.sara.positions import BLOCK, count, decode, encode
from difftune.methods.verbs import hosts
from difftune.testing import tiny_unet


@pytest.mark.parametrize(("n", "density"), [(1, 1.0), (700, 0.0), (BLOCK * 5, 1.0), (1001, 0.3), (100_003, 0.05)])
def test_positions_decode_to_the_selected_indices(n: int, density: float):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < density
    low, counts = encode(mask)
    assert low.dtype == torch.uint8 and counts.dtype == torch.int32
    idx = decode(low, counts)
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), mask.nonzero().squeeze(1))
    assert count(counts) == int(mask.sum())


def test_the_positions_cost_about_a_byte_per_selected_entry():
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=0.02), name="s")
    dt.fuse(model)  # how they are kept once fused or loaded (freshly injected, none are: test_sara_blocks.py)
    selected = blocks = kept = 0
    for _, host in hosts(model):
        adapter = host.adapters["s"]
        selected += adapter.selected()
        blocks += sum(-(-p.numel() // BLOCK) for p in host.base_layer.parameters(recurse=False))
        kept += sum(b.numel() * b.element_size() for n, b in adapter.named_buffers()
                    if not n.startswith(("w0_", "sara_base_")) and b is not None)
    # 1 byte per selected entry and 2 per block of 256 entries of the tensor (a 4-byte index each before)
    assert selected > 10_000 and kept == selected + 4 * blocks



def _merged_grads(monkeypatch, by_output: bool, chunk: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """∂L/∂Δ of a fused SaRA on the tiny UNet, with the weight gradient formed from the output (`WeightGrad`) or
    by autograd's dense dL/dW (`RouteGrad`); also the sizes of the conv weight-gradient blocks formed."""
    import difftune.methods.sara.adapter as sara_adapter
    import difftune.methods.sara.grads as sara_grads
    from difftune.testing import randomize_adapter

    if not by_output:
        monkeypatch.setattr(sara_adapter, "gradient_rule", lambda layer: False)
    if chunk is not None:
        monkeypatch.setattr(sara_grads, "CHUNK", chunk)
    blocks: list[int] = []
    conv2d_weight = torch.nn.grad.conv2d_weight

    def spy(x, shape, grad, *args):
        blocks.append(int(torch.Size(shape).numel()))
        return conv2d_weight(x, shape, grad, *args)

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", spy)
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=0.02), name="s")
    randomize_adapter(model, "s", seed=3, std=0.01)
    dt.merge(model)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    model(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample.pow(2).mean().backward()
    grads = torch.cat([p.grad for p in dt.methods.verbs.adapter_parameters(model, "s")])
    monkeypatch.undo()
    return grads, blocks


def test_weight_gradients_formed_in_blocks_equal_the_dense_route(monkeypatch):
    """Fused SaRA forms a Linear/Conv2d weight's gradient at M from the layer's output a block of output channels at
    a time (issue 27: the dense dL/dW of one big layer set the training peak); ∂L/∂Δ is the dense route's."""
    dense, none = _merged_grads(monkeypatch, by_output=False)
    blocked, sizes = _merged_grads(monkeypatch, by_output=True)
    small, small_sizes = _merged_grads(monkeypatch, by_output=True, chunk=600)
    assert not none and sizes  # the dense route forms no block; the new one does (strided and 3×3 convs included)
    assert max(small_sizes) <= 600 * 3 * 3 and len(small_sizes) > len(sizes)  # a row of a 3×3 conv can exceed CHUNK
    assert dense.abs().max() > 1e-3
    # the same products split by output channel: equal up to float rounding (different BLAS blocking)
    torch.testing.assert_close(blocked, dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(small, dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unbatched", [False, True])
def test_a_fused_conv_forms_neither_its_weight_nor_its_bias_gradient(unbatched: bool):
    """Asked for its bias gradient, a CPU convolution forms the dense dL/dW as well (oneDNN); fused SaRA therefore
    gives the layer a weight and a bias that need no gradient and forms both gradients at M from the output."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2)
    reference = copy.deepcopy(conv)
    model = torch.nn.Sequential(conv)
    dt.inject(model, SaRAConfig(threshold=0.1), name="s")
    host = model[0]
    adapter = host.adapters["s"]
    for p in adapter.pnames:
        adapter.delta_vector(p).data.normal_(0, 0.05)
    dt.merge(model)
    x = torch.randn(*(() if unbatched else (2,)), 6, 9, 9, requires_grad=True)
    out = model(x)
    conv_node = out.grad_fn.next_functions[0][0]
    while not type(conv_node).__name__.startswith("Convolution"):  # an unbatched call squeezes the batch away
        conv_node = conv_node.next_functions[0][0]
    assert [f is None for f, _ in conv_node.next_functions] == [False, True, True]  # input only
    out.pow(2).sum().backward()
    # the same loss through a plain layer holding W0 + Δ: its dense gradients gathered at M
    with torch.no_grad():
        for p in adapter.pnames:
            getattr(reference, p).copy_(getattr(host.base_layer, p))
    reference(x.detach()).pow(2).sum().backward()
    for p in adapter.pnames:
        expected = getattr(reference, p).grad.reshape(-1)[adapter.index(p).long()]
        torch.testing.assert_close(adapter.delta_vector(p).grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
def test_fused_linear_gradients_at_any_input_rank(shape: tuple[int, ...]):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    reference = copy.deepcopy(model[0])
    dt.inject(model, SaRAConfig(threshold=0.3), name="s")
    adapter = model[0].adapters["s"]
    for p in adapter.pnames:
        adapter.delta_vector(p).data.normal_(0, 0.05)
    dt.merge(model)
    x = torch.randn(shape)
    model(x).pow(2).sum().backward()
    with torch.no_grad():
        for p in adapter.pnames:
            getattr(reference, p).copy_(getattr(model[0].base_layer, p))
    reference(x).pow(2).sum().backward()
    assert adapter.delta_vector("bias").numel() > 0
    for p in adapter.pnames:
        expected = getattr(reference, p).grad.reshape(-1)[adapter.index(p).long()]
        torch.testing.assert_close(adapter.delta_vector(p).grad, expected, rtol=1e-5, atol=1e-6)


def test_blocked_weight_gradients_under_checkpointing_and_bf16_autocast():
    """The output node is recomputed with its layer under gradient checkpointing, and takes bf16 gradients."""
    from difftune.testing import randomize_adapter

    grads = []
    for checkpointing in (False, True):
        model = tiny_unet(0)
        dt.inject(model, SaRAConfig(threshold=0.02), name="s")
        randomize_adapter(model, "s", seed=3, std=0.01)
        dt.merge(model)
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.train()
        g = torch.Generator().manual_seed(1)
        x, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample
        out.float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad for p in dt.methods.verbs.adapter_parameters(model, "s")]))
    assert grads[0].dtype == torch.float32 and grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)  # the same kernels recomputed


def test_the_one_pass_rewrite_writes_what_restore_then_add_wrote(monkeypatch):
    """Fused SaRA's entries are rewritten from W0[M] + Δ after every optimizer step; `SaRAAdapter.rewrite` does it
    in one pass (a decode and a write instead of two of each): the same values, bit for bit (elementwise fp32 sums)."""
    from difftune.methods.sara import SaRAAdamW, SaRAAdapter

    calls = []
    one_pass_rewrite = SaRAAdapter.rewrite

    def counted(self, pname, param, weight):
        calls.append(weight)
        one_pass_rewrite(self, pname, param, weight)

    def composed(self, pname, param, weight):  # the two passes the host made before
        self.restore(pname, param)
        if weight is not None:
            self.add_into(pname, param, weight)

    weights = []
    for one_pass in (True, False):
        monkeypatch.setattr(SaRAAdapter, "rewrite", counted if one_pass else composed)
        model = tiny_unet(0)
        opt = SaRAAdamW(model, threshold=0.02, lr=1e-3, fused_training=True)
        g = torch.Generator().manual_seed(1)
        x, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
        for _ in range(3):
            model(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model(x, torch.tensor([10, 500]), encoder_hidden_states=cond)  # the forward rewrites the stale entries
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "sara_" not in n})
        dt.unfuse(model)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "sara_" not in n})
    assert calls.count(1.0) > 100 and None in calls  # the host took the one-pass route, merged and unmerged
    for fused in (0, 1):
        assert weights[fused].keys() == weights[fused + 2].keys()
        assert all(torch.equal(weights[fused][n], weights[fused + 2][n]) for n in weights[fused])
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in weights[0])  # training moved the fused weights
