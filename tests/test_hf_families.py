"""More model families written by others, from Hugging Face (tiny configs, random weights, no
downloads): convolutional (ConvNeXt: channels-last blocks around depthwise convolutions),
hybrid convolution / attention (CvT: convolutional token embeddings and q/k/v projections),
audio (Wav2Vec2: a convolutional feature encoder and a transformer, CTC loss), encoder-decoder
(T5; Whisper, audio too). Each trains one step under the default recipe and a paper recipe, and
prints the share of the step's GEMM FLOPs that ran quantized; once more in a fresh process under
the default recipe, for one model of each kind (ConvNeXt with Inductor, CvT and Whisper on the
eager kernels).
Skipped cleanly without ``transformers``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fqt_compiler as fqt
from fqt_compiler.coverage import Coverage, DynamoSnapshot
from fqt_compiler.flops import step_flops

T = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


# ----- factories begin
def g(seed):
    return torch.Generator().manual_seed(seed)


def convnext():
    cfg = T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=32)
    x, y = torch.randn(2, 3, 32, 32, generator=g(2)), torch.randint(0, 3, (2,), generator=g(1))
    return T.ConvNextForImageClassification(cfg), {"pixel_values": x}, lambda o: F.cross_entropy(o.logits, y)


def cvt():
    def three(v):
        return [v, v, v]

    cfg = T.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 1, 2], depth=[1, 2, 3], patch_sizes=[7, 3, 3], patch_stride=[4, 2, 2],
                      patch_padding=[2, 1, 1], mlp_ratio=three(2.0), attention_drop_rate=three(0.0), drop_rate=three(0.0),
                      drop_path_rate=three(0.0), qkv_bias=three(True), cls_token=[False, False, True], padding_q=three(1),
                      padding_kv=three(1), kernel_qkv=three(3), stride_kv=three(2), stride_q=three(1), num_labels=3)
    x, y = torch.randn(2, 3, 32, 32, generator=g(2)), torch.randint(0, 3, (2,), generator=g(1))
    return T.CvtForImageClassification(cfg), {"pixel_values": x}, lambda o: F.cross_entropy(o.logits, y)


def wav2vec2():
    cfg = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                           conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                           vocab_size=12, mask_time_prob=0.0)
    x = torch.randn(2, 800, generator=g(2))
    labels = torch.randint(1, 12, (2, 5), generator=g(1))
    return T.Wav2Vec2ForCTC(cfg), {"input_values": x, "labels": labels}, lambda o: o.loss


def t5():
    cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                     decoder_start_token_id=0)
    ids, labels = torch.randint(0, 64, (2, 8), generator=g(2)), torch.randint(0, 64, (2, 6), generator=g(1))
    return T.T5ForConditionalGeneration(cfg), {"input_ids": ids, "labels": labels}, lambda o: o.loss


def whisper():
    cfg = T.WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=16,
                          max_target_positions=16, pad_token_id=0, decoder_start_token_id=1)
    feats, labels = torch.randn(2, 8, 32, generator=g(2)), torch.randint(2, 64, (2, 6), generator=g(1))
    return T.WhisperForConditionalGeneration(cfg), {"input_features": feats, "labels": labels}, lambda o: o.loss

# ----- factories end

FAMILIES = [convnext, cvt, wav2vec2, t5, whisper]
# shares measured when these tests were written (CPU, torch 2.13): a drop means GEMMs went missing
MIN_SHARE = {"convnext": 0.99, "cvt": 0.99, "wav2vec2": 0.5, "t5": 0.99, "whisper": 0.8}


# int8 (the default recipe) on convnext, cvt and whisper runs in the fresh process below
_CASES = [(f, "psq8") for f in FAMILIES] + [(wav2vec2, "int8"), (t5, "int8")]


@pytest.mark.parametrize(("factory", "recipe"), _CASES, ids=[f"{f.__name__}-{r}" for f, r in _CASES])
def test_family_trains_one_step(factory, recipe, capsys):
    torch.manual_seed(0)
    model, inputs, loss_fn = factory()
    be = fqt.backend(recipe=recipe, inductor=False)
    before = DynamoSnapshot.take()
    loss = loss_fn(torch.compile(model, backend=be)(**inputs))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    sites = [d for r in be.records for d in r.decisions]
    cov = Coverage.of(sites, step_flops(model, (), inputs), DynamoSnapshot.take().since(before))
    with capsys.disabled():
        print(f"\n  {factory.__name__} {recipe}: {cov.summary()}")
    assert cov.share is not None and cov.share >= MIN_SHARE[factory.__name__], cov.summary()
    assert any(g.status is fqt.GemmStatus.LOWBIT_KERNEL for s in sites for g in s.gemms)


_FRESH = """
import torch, transformers as T, torch.nn.functional as F
import fqt_compiler as fqt
exec(open(__FILE__).read().split("# ----- factories end")[0].split("# ----- factories begin")[1])
# conv, hybrid, audio encoder-decoder; Inductor's cold C++ compiles of every graph of all three
# took ten minutes of CI, so one compiles with Inductor, the others run fqt's eager kernels
for factory, inductor in ((convnext, True), (cvt, False), (whisper, False)):
    torch.manual_seed(0)
    model, inputs, loss_fn = factory()
    loss = loss_fn(torch.compile(model, backend=fqt.backend(inductor=inductor))(**inputs))
    loss.backward()
    assert torch.isfinite(loss), factory.__name__
    print("OK", factory.__name__, flush=True)
"""


def test_families_in_a_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH.replace("__FILE__", repr(__file__))], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["OK", "convnext", "OK", "cvt", "OK", "whisper"], proc.stdout
