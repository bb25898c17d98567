"""Hugging Face transformers: quantize_ on a causal LM, generate, save/load, and transformers' own
FineGrainedFP8 loader reading what save_quantized writes. A tiny random-init Llama whose Linear
dimensions are multiples of 128; nothing is downloaded."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from torchao.quantization import quantize_

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 loader refuses to run without it

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Tensor  # noqa: E402
from blockwise_fp8.checkpoint import load_quantized, save_quantized  # noqa: E402

from .helpers import expand_blocks, sqnr_db  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
VOCAB = 320
# Two layers of e4m3 activations and weights: each quantized GEMM input is within 1/28 of its
# block's amax (docs/numerics.md), about 30 dB per operand on Gaussian-like data; after 14 GEMMs
# the logits of the random-init model keep more than 20 dB. A wrong scale convention (inverted,
# transposed, misaligned blocks) gives noise at or below 0 dB.
MIN_SQNR_DB = {E4M3: 20.0, E5M2: 14.0}


def _config(tie=False):
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )


def _model(seed=0, tie=False):
    torch.manual_seed(seed)
    # as from_pretrained builds it: bf16 weights, float32 rotary buffers
    return LlamaForCausalLM._from_config(_config(tie), dtype=torch.bfloat16).eval()


def _quantized(weight_dtype=E4M3, tie=False):
    m = _model(tie=tie)
    quantize_(m, BlockwiseFP8Config(weight_dtype=weight_dtype))  # lm_head stays bf16 by default
    return m


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits.float()


def _linear_names(m):
    return [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]


def test_quantize_and_generate():
    bf16 = _logits(_model())
    m = _quantized()
    for name in _linear_names(m):
        w = m.get_submodule(name).weight
        assert isinstance(w, BlockwiseFP8Tensor) == (name != "lm_head"), name
    assert m.lm_head.weight.dtype == torch.bfloat16 and type(m.lm_head.weight) is torch.nn.Parameter
    out = _logits(m)
    assert sqnr_db(bf16, out) > MIN_SQNR_DB[E4M3]
    gen = m.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 16) and torch.equal(gen[:, :12], IDS)
    # the first generated token is the argmax of the quantized model's last logits
    assert torch.equal(gen[:, 12], out[:, -1].argmax(-1))


@pytest.mark.parametrize("tie", [False, True])
def test_save_then_load_quantized(tmp_path, tie):
    m = _quantized(tie=tie)
    path = save_quantized(m, tmp_path / "ck")
    fresh = _model(seed=7, tie=tie)
    load_quantized(fresh, path)
    assert torch.equal(_logits(fresh), _logits(m))
    if tie:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_load_into_a_model_built_without_memory(tmp_path):
    """The workflow for checkpoints larger than memory: parameters on meta, buffers (rotary
    tables, not in the checkpoint) real."""
    from accelerate import init_empty_weights

    m = _quantized()
    path = save_quantized(m, tmp_path / "ck")
    with init_empty_weights(include_buffers=False):
        skeleton = LlamaForCausalLM._from_config(_config(), dtype=torch.bfloat16).eval()
    assert skeleton.model.layers[0].mlp.up_proj.weight.is_meta
    load_quantized(skeleton, path, device="cpu")
    assert torch.equal(_logits(skeleton), _logits(m))
    with torch.device("meta"):  # everything on meta: the rotary table cannot come from the checkpoint
        all_meta = LlamaForCausalLM._from_config(_config(), dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"still on the meta device \(model.rotary_emb.inv_freq"):
        load_quantized(all_meta, path)


def _file_tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.mark.parametrize("weight_dtype", [E4M3, E5M2])
def test_transformers_finegrained_fp8_loader_reads_our_checkpoint(tmp_path, weight_dtype):
    """On CPU, transformers' FineGrainedFP8 loader dequantizes each weight with its
    weight_scale_inv: it must find exactly q * scale (the test's own float64 dequantization),
    and its logits must match our model's up to the activation quantization that only we do."""
    m = _quantized(weight_dtype)
    path = save_quantized(m, tmp_path / "ck")
    from transformers import FineGrainedFP8Config

    # dequantize=True is what transformers picks by itself without a GPU; asking for it makes the
    # test the same on a CUDA machine (whose FP8Linear kernels come from the Hub, unreachable offline)
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True))
    files = _file_tensors(path)
    weight_only = _model()  # same values as m before quantization
    for name in _linear_names(m):
        w = loaded.get_submodule(name).weight
        if name == "lm_head":
            assert torch.equal(w, m.lm_head.weight)
            continue
        q, s = files[f"{name}.weight"], files[f"{name}.weight_scale_inv"]
        assert q.dtype == weight_dtype
        expected = (q.double() * expand_blocks(s.double(), 128, 128, q.shape)).to(torch.bfloat16)
        assert torch.equal(w, expected), name
        weight_only.get_submodule(name).weight.data.copy_(expected)
    # the same weights in high precision: transformers computes exactly the weight-only model
    theirs = _logits(loaded)
    assert torch.equal(theirs, _logits(weight_only))
    assert sqnr_db(theirs, _logits(m)) > MIN_SQNR_DB[weight_dtype]


def test_checkpoint_fits_transformers_gpu_fp8_layout(tmp_path):
    """transformers' GPU path swaps every Linear not in modules_to_not_convert for an FP8Linear
    (weight float8_e4m3fn, weight_scale_inv float32 of shape ceil(N/128) x ceil(K/128)): our file
    must hold exactly those tensors, with those shapes and dtypes."""
    from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear
    from transformers.utils.quantization_config import FineGrainedFP8Config

    m = _quantized()
    path = save_quantized(m, tmp_path / "ck")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    fp8_config = FineGrainedFP8Config(**{k: v for k, v in qc.items() if k != "quant_method"})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(_config()).to(torch.bfloat16)
    replace_with_fp8_linear(skeleton, modules_to_not_convert=qc["modules_to_not_convert"],
                            quantization_config=fp8_config, pre_quantized=True)
    swapped = [n for n, mod in skeleton.named_modules() if isinstance(mod, FP8Linear)]
    assert sorted(swapped) == sorted(n for n in _linear_names(m) if n != "lm_head")
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    files = _file_tensors(path)
    assert {k: (tuple(v.shape), v.dtype) for k, v in files.items()} == expected
    for name in swapped:
        n, k = m.get_submodule(name).weight.shape
        assert expected[f"{name}.weight_scale_inv"][0] == (math.ceil(n / 128), math.ceil(k / 128))
