"""BlockwiseFP8Config with torchao's quantize_: models end to end against the bf16 model and the
float64 simulation of the same numerics, the skip warnings, and config validation."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Tensor, reference
from blockwise_fp8 import config as config_module
from blockwise_fp8.config import BlockwiseFP8SkipWarning, BlockwiseFP8UntieWarning

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PAIRS = [(E4M3, E4M3), (E5M2, E5M2), (E4M3, E5M2)]  # (activation, weight)


class MLP(nn.Module):
    def __init__(self, d=200, h=320):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """A pre-norm transformer block: attention (separate q/k/v/o) and a SwiGLU MLP."""

    def __init__(self, d=160, heads=4, ffn=288):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(a)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _sqnr_db(ref, approx):
    ref = ref.double()
    return float(20 * torch.log10(ref.norm() / (ref - approx.double()).norm()))


def _simulate(model, x, act, wdt):
    """The same model with every Linear computed by the float64 oracle (reference.py)."""
    sims = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            q, s = reference.quantize(mod.weight.detach(), (128, 128), wdt)
            sims[name] = (q, s)

    def hook(name):
        def run(mod, args, out):
            q, s = sims[name]
            b = None if mod.bias is None else mod.bias.detach()
            return reference.linear(args[0], q, s, b, activation_dtype=act, out_dtype=args[0].dtype)
        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n in sims]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def _fp8_eps(dtype):
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("act, wdt", PAIRS)
@pytest.mark.parametrize("make, shape", [(MLP, (3, 5, 200)), (Block, (2, 8, 160))])
def test_model_end_to_end(make, shape, act, wdt):
    torch.manual_seed(0)
    model = make().to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    sim = _simulate(model, x, act, wdt)

    quantize_(model, BlockwiseFP8Config(activation_dtype=act, weight_dtype=wdt))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m.weight, BlockwiseFP8Tensor) for m in linears)
    assert all(m.weight.qdata.dtype == wdt and m.weight.activation_dtype == act for m in linears)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # Exactly the float64 simulation of the blockwise numerics (reference backend on CPU).
    assert torch.equal(out, sim)
    # And close to bf16: the coarsest FP8 format in play sets the noise. A value rounded to
    # eps-spaced mantissas has a relative error below eps/2, an SQNR above 20*log10(2/eps);
    # two quantized operands per layer double the noise power (-3 dB).
    eps = max(_fp8_eps(act), _fp8_eps(wdt))
    floor = 20 * math.log10(2 / eps) - 3
    assert _sqnr_db(ref, out) > floor


def test_extra_repr_shows_the_quantization():
    model = MLP().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(weight_dtype=E5M2, backend="reference"))
    text = repr(model)
    assert text.count("BlockwiseFP8(") == 2
    assert "weight=torch.float8_e5m2 128x128" in text and "activation=torch.float8_e4m3fn 1x128" in text
    assert "backend=reference" in text and "in_features=200" in text


def test_filter_fn_narrows():
    model = MLP().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn == "up")
    assert isinstance(model.up.weight, BlockwiseFP8Tensor)
    assert type(model.down.weight) is nn.Parameter


def _quantize_with_warnings(model, cfg=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, cfg or BlockwiseFP8Config())
    ours = [w for w in caught if issubclass(w.category, BlockwiseFP8SkipWarning)]
    assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]  # the quantize_ call
    return [str(w.message) for w in ours]


def test_unquantizable_linears_are_skipped_with_a_named_warning():
    model = nn.Sequential()
    model.add_module("good", nn.Linear(64, 32))
    model.add_module("narrow_out", nn.Linear(64, 8))
    model.add_module("narrow_in", nn.Linear(4, 64))
    model.add_module("f64", nn.Linear(64, 64))
    model.to(torch.bfloat16)
    model.f64.double()
    messages = _quantize_with_warnings(model)
    assert isinstance(model.good.weight, BlockwiseFP8Tensor)
    for name in ("narrow_out", "narrow_in", "f64"):
        assert type(getattr(model, name).weight) is nn.Parameter
        assert sum(f"'{name}'" in m for m in messages) == 1, messages
    assert any("(8, 64)" in m and "at least 16" in m for m in messages)
    assert any("torch.float64" in m for m in messages)
    assert not any("'good'" in m for m in messages)


def test_non_floating_weight_is_skipped_with_a_warning():
    lin = nn.Linear(32, 32)
    lin.weight = nn.Parameter(torch.ones(32, 32, dtype=torch.int32), requires_grad=False)
    messages = _quantize_with_warnings(nn.Sequential(lin))
    assert type(lin.weight) is nn.Parameter
    assert len(messages) == 1 and "torch.int32" in messages[0] and "'0'" in messages[0]


def test_quantizing_twice_warns_and_keeps_the_weight():
    model = MLP().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config())
    before = model.up.weight
    messages = _quantize_with_warnings(model)
    assert model.up.weight is before
    assert len(messages) == 2 and all("already a BlockwiseFP8Tensor" in m for m in messages)


def test_non_finite_weight_is_refused_with_the_module_name():
    model = MLP().to(torch.bfloat16)
    with torch.no_grad():
        model.down.weight[3, 250] = float("inf")
    with pytest.raises(ValueError, match="'down'.*NaN or Inf"):
        quantize_(model, BlockwiseFP8Config())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(activation_dtype=torch.bfloat16), ValueError, "activation_dtype"),
        (dict(weight_dtype=torch.int8), ValueError, "weight_dtype"),
        (dict(weight_dtype="e4m3"), TypeError, "torch.dtype"),
        (dict(block_size=64), ValueError, "must be 128"),
        (dict(block_size=128.0), TypeError, "int"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BlockwiseFP8Config(**kwargs)


def test_config_defaults():
    cfg = BlockwiseFP8Config()
    assert (cfg.activation_dtype, cfg.weight_dtype, cfg.block_size, cfg.backend) == (E4M3, E4M3, 128, "auto")


class _WithHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
        self.lm_head = torch.nn.Linear(128, 200)


def test_lm_head_stays_high_precision_by_default():
    m = _WithHead()
    quantize_(m, BlockwiseFP8Config())
    assert type(m.lm_head.weight) is torch.nn.Parameter and m.lm_head.weight.dtype == torch.float32
    assert all(isinstance(lin.weight, BlockwiseFP8Tensor) for lin in m.body)


def test_skip_patterns_choose_what_stays():
    m = _WithHead()
    quantize_(m, BlockwiseFP8Config(skip=()))
    assert isinstance(m.lm_head.weight, BlockwiseFP8Tensor)
    m = _WithHead()
    quantize_(m, BlockwiseFP8Config(skip=(r"^body\.1$",)))
    assert isinstance(m.body[0].weight, BlockwiseFP8Tensor) and isinstance(m.lm_head.weight, BlockwiseFP8Tensor)
    assert type(m.body[1].weight) is torch.nn.Parameter


class _TiedLM(torch.nn.Module):
    """An embedding and an lm_head sharing one weight, as tie_word_embeddings models have."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(200, 128)
        self.model.proj = torch.nn.Linear(128, 128)
        self.lm_head = torch.nn.Linear(128, 200, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def test_quantizing_a_tied_head_warns_that_it_unties():
    m = _TiedLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(m, BlockwiseFP8Config(skip=()))
    untie = [w for w in caught if issubclass(w.category, BlockwiseFP8UntieWarning)]
    assert len(untie) == 1, [str(w.message) for w in caught]
    assert "'lm_head'" in str(untie[0].message) and "'model.embed_tokens'" in str(untie[0].message)
    assert untie[0].filename == __file__  # points at the quantize_ call
    assert isinstance(m.lm_head.weight, BlockwiseFP8Tensor)
    assert type(m.model.embed_tokens.weight) is torch.nn.Parameter  # the embedding keeps its weight
    # the default keeps the head, and the tie, silently; untied weights never warn
    for model, config in ((_TiedLM(), BlockwiseFP8Config()), (_WithHead(), BlockwiseFP8Config(skip=()))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", BlockwiseFP8UntieWarning)
            quantize_(model, config)
    tied = _TiedLM()
    quantize_(tied, BlockwiseFP8Config())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # one Linear under two names is one module: quantizing it unties nothing
    shared = nn.Linear(128, 128)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockwiseFP8UntieWarning)
        quantize_(twice, BlockwiseFP8Config())
    assert isinstance(twice[2].weight, BlockwiseFP8Tensor) and twice[0] is twice[2]


def test_shared_parameters_are_found_once_per_quantize_call(monkeypatch):
    """The walk over the model that finds tied weights runs once per quantize_ call, not once per
    Linear (quadratic on a large MoE)."""
    calls = []
    real = config_module._shared_parameters
    monkeypatch.setattr(config_module, "_shared_parameters", lambda root: calls.append(root) or real(root))
    cfg = BlockwiseFP8Config()
    models = [nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)]) for _ in range(2)]
    for m in models:  # two calls with one config object: each walks its own model once
        quantize_(m, cfg)
        assert all(isinstance(lin.weight, BlockwiseFP8Tensor) for lin in m)
    assert len(calls) == 2 and calls[0] is models[0] and calls[1] is models[1]


@pytest.mark.parametrize(
    "skip,exc,match",
    [
        ("lm_head", TypeError, "tuple or list of strings"),
        ((1,), TypeError, "a skip pattern must be a string, got int"),
        (("(",), ValueError, "not a valid regular expression"),
    ],
)
def test_bad_skip_patterns(skip, exc, match):
    with pytest.raises(exc, match=match):
        BlockwiseFP8Config(skip=skip)
