"""KIND (reconstructed): class gate isolation, learngene gradients, SVD init, save/load, transfer, recombination,
config errors and the parameter calculator."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import difftune as dt
from difftune.errors import DifftuneError
from difftune.methods.kind import (
    KINDConfig,
    KINDPlugin,
    calculator,
    factored_macs,
    kind_adapters,
    load_parts,
    recombine,
)
from difftune.serialization import read_tensors, save_adapter_file
from difftune.testing import tiny_dit

S = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _inputs(labels):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(len(labels), 4, 16, 16, generator=g),
            {"timestep": torch.tensor([10] * len(labels)), "class_labels": torch.tensor(labels)})


def _run(model, labels):
    x, kw = _inputs(labels)
    return model(x, **kw).sample


def _kind(**fields):
    model = tiny_dit(0)
    cfg = KINDConfig(**{"target_modules": S, "learngenes": 24, "tailors_per_class": 8, "classes": [1, 3], **fields})
    dt.inject(model, cfg, name="k")
    return model


def test_svd_init_reproduces_the_dense_output():
    ref = tiny_dit(0)
    model = _kind()
    with torch.no_grad():
        for labels in ([1, 3, 3], [3, 1, 1]):
            torch.testing.assert_close(_run(model, labels), _run(ref, labels), atol=1e-5, rtol=0)
        # the null class (and any label without a group) runs on the learngenes alone: rank 24 of 32
        assert (_run(model, [1000, 1, 3]) - _run(ref, [1000, 1, 3]))[0].abs().max() > 1e-3
        torch.testing.assert_close(_run(model, [1000, 1, 3])[1:], _run(ref, [1000, 1, 3])[1:], atol=1e-5, rtol=0)


def test_random_init_is_not_the_dense_layer():
    ref, model = tiny_dit(0), _kind(init="random")
    with torch.no_grad():
        assert (_run(model, [1, 3]) - _run(ref, [1, 3])).abs().max() > 1e-3


def _grads(model, labels):
    model.zero_grad(set_to_none=True)
    for p in dt.methods.verbs.adapter_parameters(model, "k"):
        p.requires_grad_(True)
    _run(model, labels).pow(2).mean().backward()
    (_, a), *_ = kind_adapters(model, "k")
    return a


def test_gate_isolates_tailors_and_learngenes_learn_from_every_class():
    model = _kind()
    a = _grads(model, [1, 1])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.tailor_parameters(1))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in a.tailor_parameters(3))
    assert all(p.grad.abs().sum() > 0 for p in a.learngene_parameters())
    for labels in ([3], [1000]):  # learngenes get a gradient from every class, the null class included
        a = _grads(model, labels)
        assert all(p.grad.abs().sum() > 0 for p in a.learngene_parameters())
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in a.tailor_parameters(1))
    # per item: class 3's gradient on a mixed batch is that of its own item alone
    mixed = [g.clone() for g in (p.grad for p in _grads(model, [1, 3]).tailor_parameters(3))]
    x, kw = _inputs([1, 3])
    model.zero_grad(set_to_none=True)
    (model(x, **kw).sample[1:]).pow(2).sum().div(model(x, **kw).sample.numel()).backward()
    (_, a), *_ = kind_adapters(model, "k")
    for g, p in zip(mixed, a.tailor_parameters(3)):
        torch.testing.assert_close(g, p.grad, atol=1e-7, rtol=1e-4)


def test_save_load_round_trip_and_parts(tmp_path):
    model = _kind()
    dt.testing.randomize_adapter(model, "k", seed=3)
    with torch.no_grad():
        expected = _run(model, [1, 3, 1000])
    folder = save_adapter_file(model, tmp_path / "kind", name="k")
    fresh = tiny_dit(0)
    dt.load_adapter(fresh, folder, name="k")
    with torch.no_grad():
        torch.testing.assert_close(_run(fresh, [1, 3, 1000]), expected, atol=0, rtol=0)
    # learngenes alone, then one class's tailors alone, into a model with other groups
    other = _kind(classes=[3, 7])
    tensors = read_tensors(folder)
    load_parts(other, "k", tensors, learngenes=True)
    load_parts(other, "k", tensors, learngenes=False, classes=[3])
    with torch.no_grad():
        torch.testing.assert_close(_run(other, [1, 3, 1000])[1:], expected[1:], atol=0, rtol=0)  # 1: no group there
    with pytest.raises(DifftuneError, match="kind_tU.7"):
        load_parts(other, "k", tensors, learngenes=False, classes=[7])


def test_an_items_output_does_not_depend_on_the_other_classes_in_its_batch():
    # the guarantee behind "old classes bit-identical": for batches of one shape, item 1 (class 3) gets the same bits
    # whichever classes (or none, or the null class) share the batch, in a model holding groups for 1, 3 and 5
    model = _kind(classes=[1, 3, 5])
    dt.testing.randomize_adapter(model, "k", seed=4)
    x, _ = _inputs([0, 0, 0])
    with torch.no_grad():
        outs = [model(x, timestep=torch.tensor([10] * 3), class_labels=torch.tensor(labels)).sample[1]
                for labels in ([1, 3, 5], [3, 3, 3], [1000, 3, 1000], [5, 3, 1], [2, 3, 7])]
    for y in outs[1:]:
        assert torch.equal(y, outs[0])
    # what makes it hold on every CPU (bit-equality above can pass by luck on one BLAS): no matmul's reduction length
    # depends on the classes present, since BLAS rounding follows the reduction length and blocking
    (_, layer), *_ = kind_adapters(model, "k")
    h = torch.randn(3, 5, 32)

    def reduction_lengths(labels):
        seen = set()

        class Spy(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, F.linear):
                    seen.add(args[0].shape[-1])
                elif func in (torch.baddbmm, torch.addmm, torch.Tensor.baddbmm_, torch.Tensor.addmm_):
                    seen.add(args[1].shape[-1])  # input + mat1 @ mat2: mat1's last dim is reduced
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(labels)), Spy():
            layer.kind_forward(h)
        return seen

    assert reduction_lengths([1, 3, 5]) == reduction_lengths([3, 3, 3]) == reduction_lengths([1000, 3, 1])
    assert layer.config.tailors_per_class in reduction_lengths([1, 3, 5])  # the spy sees the tailors' second matmul


def test_transfer_trains_only_fresh_tailors(tmp_path):
    model = _kind()
    folder = save_adapter_file(model, tmp_path / "pre", name="k")
    new = tiny_dit(0)
    cfg = KINDConfig(target_modules=S, learngenes=24, tailors_per_class=8, classes=[1, 5], source=str(folder),
                     reuse_classes=[1], train_learngenes=False)
    plugin = KINDPlugin(cfg, "k")
    plugin.prepare(None, new)
    params = plugin.trainable_parameters(new)
    (_, a), *_ = kind_adapters(new, "k")
    fresh = {id(p) for _, b in kind_adapters(new, "k", rows=True) for p in b.tailor_parameters(5)}
    assert {id(p) for p in params} == fresh and len(fresh) == 3 * 12 + 2  # 12 KIND layers, 2 blocks' class rows
    assert all(float(b.kind_tS["5"].detach().abs().sum()) == 0 for _, b in kind_adapters(new, "k"))  # fresh: σ = 0
    ref = tiny_dit(0)
    with torch.no_grad():  # reused class 1 is the pretrained layer exactly; fresh class 5 starts at learngenes only
        torch.testing.assert_close(_run(new, [1]), _run(ref, [1]), atol=1e-5, rtol=0)
        h = torch.randn(1, 5, 32).expand(3, 5, 32)
        with dt.adapter_inputs(class_labels=torch.tensor([5, 1000, 1])):
            y = a.kind_forward(h)
        torch.testing.assert_close(y[0], y[1], atol=0, rtol=0)
        assert (y[2] - y[1]).abs().max() > 1e-4


def test_recombination_and_flops():
    model = _kind()
    before = factored_macs(model, "k")
    report = recombine(model, "k", keep=[3])
    assert report["kept_classes"] == [3] and all(a.groups() == [3] for _, a in kind_adapters(model, "k"))
    assert report["factored_macs_per_token"] == before["factored_macs_per_token"]
    # 2 blocks × (4 attention 32×32 + MLP 32→128, 128→32): (24 + 8)(m + n + 1) vs m·n
    assert report["factored_macs_per_token"] == 2 * 32 * (4 * 65 + 2 * 161)
    assert report["dense_macs_per_token"] == 2 * (4 * 1024 + 2 * 4096)
    with pytest.raises(DifftuneError, match="keep"):
        recombine(model, "k", keep=[1])


@pytest.mark.parametrize("fields, key", [
    ({"learngenes": 0}, "learngenes"), ({"tailors_per_class": -1}, "tailors_per_class"),
    ({"classes": [1, 1]}, "classes"), ({"classes": ["a"]}, "classes"), ({"init": "orth"}, "init"),
    ({"reuse_classes": [2], "classes": [1], "source": "x"}, "reuse_classes"),
    ({"reuse_classes": [1], "classes": [1]}, "reuse_classes"), ({"learngenes": "8"}, "learngenes")])
def test_config_errors_name_the_field(fields, key):
    with pytest.raises(DifftuneError, match=key):
        KINDConfig(**fields)


def test_too_many_components_and_label_mismatch_are_refused():
    with pytest.raises(DifftuneError, match="learngenes"):
        dt.inject(tiny_dit(0), KINDConfig(target_modules=S, learngenes=30, tailors_per_class=4), name="k")
    model = _kind()
    x, kw = _inputs([1, 3])
    with pytest.raises(DifftuneError, match="class labels"), dt.adapter_inputs(class_labels=torch.tensor([1, 3, 1])):
        (_, a), *_ = kind_adapters(model, "k")
        a.kind_forward(torch.randn(2, 5, 32))


def test_calculator_dit_l2(capsys):
    from difftune.architectures import build_architecture
    from difftune.cli import main

    model = build_architecture("dit-l2")
    cfg = KINDConfig(classes=[0], tailors_per_class=103, train_learngenes=False)
    dt.inject(model, cfg, name="count")
    info = calculator(cfg, model, "count")
    assert info["per_component"] == 442_512
    # class 0's row in each of the 24 blocks' class-embedding tables (1024 wide) trains with its tailors
    assert info["class_row_parameters"] == 24 * 1024
    assert info["parameters"] == 103 * 442_512 + 24 * 1024 and info["paper_nearest"]["parameters"] == 103 * 442_512
    plain = build_architecture("dit-l2")
    cfg = KINDConfig(classes=[0], tailors_per_class=103, train_learngenes=False, class_embeddings=False)
    dt.inject(plain, cfg, name="count")
    assert calculator(cfg, plain, "count")["parameters"] == 103 * 442_512
    assert info["paper_nearest"]["off_by"] == 178_736
    main(["inspect", "--method", "kind", "--architecture", "dit-l2", "--json"])
    assert json.loads(capsys.readouterr().out)["per_component"] == 442_512


@pytest.mark.parametrize("tokens", [1, 512])  # factored order for few tokens, the composed matrix for many
def test_both_evaluation_orders_equal_the_dense_weight_of_each_item(tokens):
    from difftune.methods.kind import KINDAdapter

    layer = torch.nn.Linear(24, 40)
    a = KINDAdapter(layer, KINDConfig(learngenes=20, tailors_per_class=3, classes=[2, 5]))
    with torch.no_grad():  # tailors away from their SVD copies, so every class differs
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    labels = [5, 2, 9]  # 9 has no group: learngenes only
    x = torch.randn(3, tokens, 24)
    with dt.adapter_inputs(class_labels=torch.tensor(labels)):
        got = a.kind_forward(x)
        delta = a.delta(x, layer, {"weight": layer.weight})
    for i, c in enumerate(labels):
        want = x[i] @ a.dense_weight(c).T
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(delta[i], want - x[i] @ layer.weight.T, atol=1e-5, rtol=1e-5)


def test_class_rows_belong_to_their_class_and_start_at_the_base_row():
    from difftune.methods.kind import KINDClassRows

    ref, model = tiny_dit(0), _kind()
    rows = [a for _, a in kind_adapters(model, "k", rows=True) if isinstance(a, KINDClassRows)]
    assert len(rows) == 2 and all(sorted(a.groups()) == [1, 3] for a in rows)  # one table per block (diffusers DiT)
    with torch.no_grad():
        torch.testing.assert_close(_run(model, [1, 3]), _run(ref, [1, 3]), atol=1e-5, rtol=0)
        before = _run(model, [1, 3, 1000])
        for a in rows:
            a.kind_row["3"].add_(1.0)
        out = _run(model, [1, 3, 1000])
    torch.testing.assert_close(out[[0, 2]], before[[0, 2]], atol=0, rtol=0)  # class 1 and the null class: unchanged
    assert (out[1] - before[1]).abs().max() > 1e-3
    a = _grads(model, [1, 1000])
    rows = [r for _, r in kind_adapters(model, "k", rows=True) if isinstance(r, KINDClassRows)]
    assert all(r.kind_row["1"].grad.abs().sum() > 0 for r in rows)
    assert all(r.kind_row["3"].grad is None or r.kind_row["3"].grad.abs().sum() == 0 for r in rows)
    plain = tiny_dit(0)
    dt.inject(plain, KINDConfig(target_modules=S, learngenes=24, tailors_per_class=8, classes=[1, 3],
                                class_embeddings=False), name="k")
    assert len(kind_adapters(plain, "k", rows=True)) == 12
