"""Third-party model code: Hugging Face GPT-2, BERT, LLaMA, ViT and ResNet built from small
configs (random weights, no downloads) train under backend="fqt" with no graph break, every
GEMM quantized or skipped with a stated reason, and a loss that goes down. Skipped cleanly
without the optional ``transformers`` package (``pip install 'fqt[hf]'``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fqt_compiler as fqt

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n=8):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(0))


def _labels(shape, classes):
    return torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(1))


def gpt2():
    cfg = T.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, attn_implementation="eager")
    ids = _tokens()
    return T.GPT2LMHeadModel(cfg), (ids,), lambda out: F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten())


def bert():
    cfg = T.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=64,
                       max_position_embeddings=16, num_labels=3, attn_implementation="eager")
    y = _labels((2,), 3)
    return T.BertForSequenceClassification(cfg), (_tokens(),), lambda out: F.cross_entropy(out.logits, y)


def llama():
    cfg = T.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                        intermediate_size=64, vocab_size=64, max_position_embeddings=16, attn_implementation="sdpa")
    ids = _tokens()
    return T.LlamaForCausalLM(cfg), (ids,), lambda out: F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten())


def vit():
    cfg = T.ViTConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64, image_size=16,
                      patch_size=8, num_labels=3, attn_implementation="eager")
    x, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), _labels((2,), 3)
    return T.ViTForImageClassification(cfg), (x,), lambda out: F.cross_entropy(out.logits, y)


def resnet():
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), _labels((2,), 3)
    return T.ResNetForImageClassification(cfg), (x,), lambda out: F.cross_entropy(out.logits, y)


@pytest.mark.parametrize("recipe", ["int8", "bhq5"])
@pytest.mark.parametrize("factory", [gpt2, bert, llama, vit, resnet], ids=lambda f: f.__name__)
def test_transformers_model_trains_under_fqt(factory, recipe):
    torch.manual_seed(0)
    model, inputs, loss_fn = factory()
    counters.clear()
    be = fqt.backend(recipe=recipe, execution="kernels", inductor=False)
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(compiled(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    gemms = [g for r in be.records for s in r.decisions for g in s.gemms]
    assert sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in gemms) >= 3
    for g in gemms:
        if g.status is fqt.GemmStatus.SKIPPED:
            assert "attention" in g.reason  # only LLaMA's fused SDPA, with its reason
        elif g.status is fqt.GemmStatus.SIMULATED:
            assert g.reason  # what cannot be realized says why
    batched = [(s.op, g) for r in be.records for s in r.decisions for g in s.gemms if s.op == "aten.bmm"]
    if factory in (gpt2, bert, vit):  # eager attention: its matmuls are batched GEMMs of activations
        assert batched
        for op, g in batched:  # on the batched low-bit GEMM, but BHQ's grad_lhs (T^-1 mixes batch entries)
            want = fqt.GemmStatus.SIMULATED if recipe == "bhq5" and g.kind is fqt.GemmKind.GRAD_LHS else \
                fqt.GemmStatus.LOWBIT_KERNEL
            assert g.status is want, (op, g.kind, g.reason)
