"""Static-shape steps (``StdConfig.static_steps``) give exactly the dense output, and never recompile.

Method: the oracle is plain ``model.generate`` (greedy) on the exactness tests' ragged batches (fp32,
CPU, tiny models from real configs, varied outputs asserted there and here). Sampling has no
token-level oracle, so (1) a static decode with a seeded generator must equal the eager ("off")
decode with the same seed token for token (the same logits give the same draws), and (2) the joint
distribution test of ``test_sampling`` is repeated with compiled steps.

Compiling: the tests use ``backend="aot_eager"`` with ``fullgraph=True`` (a graph break raises),
which needs no C++ compiler, and ``torch._dynamo.config.error_on_recompile`` (a guard failure within
a bucket raises). Inductor may fuse reductions in another order, so its fp32 output is checked by the
benchmark (``outputs_equal``), not here. CUDA graphs are covered by the ``gpu`` test.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

from std_core import SparseToDenseDecoder, StdConfig
from std_core import config as config_module
from std_core import decoder as decoder_module
from std_core import kv_cache as kv_module
from std_core.shared_prefill import generate_shared
from std_core.static_steps import bucket_capacity, unsupported_reason
from tests import tiny_models as tm
from tests.std_core import test_exactness as ex
from tests.std_core import test_sampling as ts

COMPILED = {"static_steps": "compile", "compile_backend": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_capacities_round_up_to_buckets() -> None:
    assert [bucket_capacity(n) for n in (1, 256, 257, 1000)] == [256, 256, 512, 1024]


def test_config_validates_and_resolves_auto() -> None:
    with pytest.raises(ValueError, match="static_steps"):
        StdConfig(static_steps="on")
    with pytest.raises(ValueError, match="compile_backend"):
        StdConfig(compile_backend="")
    assert StdConfig().static_steps_on("cpu") == "off"
    assert StdConfig().static_steps_on("cuda") == ("compile" if config_module.COMPILE_ON_CUDA else "off")
    assert StdConfig(static_steps="compile").static_steps_on("cuda") == "compile"
    assert StdConfig(static_steps="eager").static_steps_on("cuda") == "eager"


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_eager_static_steps_equal_generate(arch: str) -> None:
    c = ex.case(arch)
    for config in (
        StdConfig(gamma=4, sparse_budget=40, static_steps="eager"),
        StdConfig(mode="dense", static_steps="eager"),
    ):
        result = c.decode(config)
        tm.assert_same(result.sequences, c.reference)
        assert result.stats.static_steps == "eager"
        assert result.stats.compiles == (2 if config.mode == "std" else 1)  # draft + verify buckets


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_auto_mode_with_static_steps_equals_generate(arch: str) -> None:
    c = ex.case(arch)
    result = c.decode(StdConfig(mode="auto", gamma=4, sparse_budget=40, static_steps="eager"))
    tm.assert_same(result.sequences, c.reference)


def test_garbage_in_unused_slots_never_reaches_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Static steps attend over every slot; unused ones (here filled with large finite noise instead
    of zeros) must weigh exactly 0. Afterwards every buffer is still finite (no NaN/inf is ever
    written, which a −inf mask could not hide: 0 · NaN = NaN)."""
    real_init = kv_module.SlotLayer.lazy_initialization
    layers: list[kv_module.SlotLayer] = []

    def noisy_init(self: kv_module.SlotLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        real_init(self, key_states, value_states)
        generator = torch.Generator().manual_seed(len(layers))
        self.keys.copy_(torch.randn(self.keys.shape, generator=generator) * 1e3)
        self.values.copy_(torch.randn(self.values.shape, generator=generator) * 1e3)
        layers.append(self)

    monkeypatch.setattr(kv_module.SlotLayer, "lazy_initialization", noisy_init)
    c = ex.case("qwen2_vl")
    result = c.decode(StdConfig(gamma=4, sparse_budget=40, static_steps="eager"))
    tm.assert_same(result.sequences, c.reference)
    assert layers and all(bool(x.keys.isfinite().all() and x.values.isfinite().all()) for x in layers)


def _sample(decoder: SparseToDenseDecoder, inputs: dict, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return decoder.generate(
        **inputs, max_new_tokens=ex.MAX_NEW, do_sample=True, temperature=0.8, top_p=0.95, generator=generator
    ).sequences


def _compiled_greedy_then_sampled(arch: str) -> None:
    """Greedy and seeded sampling through one decoder with compiled steps: greedy equals generate,
    sampling equals the eager decoder's draws, and the second call compiles nothing."""
    c = ex.case(arch)
    config = StdConfig(gamma=4, sparse_budget=40, **COMPILED)
    decoder = SparseToDenseDecoder(c.tiny.model, config)
    greedy = decoder.generate(**c.inputs, max_new_tokens=ex.MAX_NEW)
    tm.assert_same(greedy.sequences, c.reference)
    assert greedy.stats.static_steps == "compile" and greedy.stats.compiles == 2
    assert greedy.stats.compile_seconds > 0
    # Static steps keep γ in the last rounds (the eager decoder shortens it to the budget), so they
    # draw more numbers there: compare what every row generated before any live row was within γ + 1
    # tokens of its budget, which both decoders drew from the same generator state.
    same = c.prompt_len + ex.MAX_NEW - config.gamma - 1
    sampled = _sample(decoder, c.inputs, seed=0)[:, :same]
    eager = SparseToDenseDecoder(c.tiny.model, StdConfig(gamma=4, sparse_budget=40, static_steps="off"))
    tm.assert_same(sampled, _sample(eager, c.inputs, seed=0)[:, :same])
    other_seed = _sample(eager, c.inputs, seed=1)[:, :same]
    assert not torch.equal(sampled, other_seed), "the draws must depend on the seed"
    assert not torch.equal(sampled, c.reference[:, :same]), "sampling must differ from greedy"
    shorter = ex.MAX_NEW - 8  # other cache lengths, the same capacity buckets: nothing compiles
    again = decoder.generate(**c.inputs, max_new_tokens=shorter)
    tm.assert_same(again.sequences, c.reference[:, : c.prompt_len + shorter])
    assert again.stats.compiles == 0 and again.stats.compile_seconds == 0.0


def test_compiled_steps_equal_generate_qwen2_vl() -> None:
    _compiled_greedy_then_sampled("qwen2_vl")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_compiled_steps_equal_generate(arch: str) -> None:
    _compiled_greedy_then_sampled(arch)


def test_compiled_dense_and_auto_modes_equal_generate() -> None:
    """Dense mode compiles one bucket; auto mode one per step shape it runs (its calibration's and
    each γ's), none of them twice (``error_on_recompile``)."""
    c = ex.case("llava_onevision")
    dense = c.decode(StdConfig(mode="dense", **COMPILED))
    tm.assert_same(dense.sequences, c.reference)
    assert dense.stats.compiles == 1
    auto = c.decode(StdConfig(mode="auto", gamma=3, sparse_budget=40, **COMPILED))
    tm.assert_same(auto.sequences, c.reference)
    assert auto.stats.static_steps == "compile" and auto.stats.compiles >= 2


def test_compiled_steps_write_the_cache_in_place() -> None:
    """What the compiler gets of a step's cache write: the in-place custom op ``write_slots`` once per
    layer (inductor re-inplaces it), never a functionalized ``scatter`` of a whole cache buffer, which
    ends in a copy of the whole buffer back into the cache every step (the compiled dense step of the
    demo model cost 2.1x the eager one on CPU through it). Checked on the graphs AOT autograd hands
    to the backend: the graph inductor would compile."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = f"std_record_graphs_{id(graphs)}"  # a backend name registers once per process
    torch._dynamo.register_backend(aot_autograd(fw_compiler=record), name=backend)
    c = ex.case("qwen2_vl")
    config = StdConfig(gamma=4, sparse_budget=40, static_steps="compile", compile_backend=backend)
    result = c.decode(config)
    tm.assert_same(result.sequences, c.reference)
    assert len(graphs) == 2  # the draft step and the verify step
    layers = c.tiny.model.config.text_config.num_hidden_layers
    for gm in graphs:
        targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        assert not [t for t in targets if "scatter" in t], targets
        writes = [n for n in gm.graph.nodes if "auto_functionalized" in str(n.target)]
        assert len(writes) == layers and all("write_slots" in str(n.args[0]) for n in writes)


@pytest.mark.slow
def test_compiled_steps_sample_the_dense_joint_distribution() -> None:
    inputs, exact, eager_decoder = ts.joint_case()
    config = StdConfig(gamma=2, sparse_budget=1, selection="sink_window", **COMPILED)
    result = SparseToDenseDecoder(eager_decoder.model, config).generate(
        **ts._expand(inputs, ts.JOINT_TRIALS),
        max_new_tokens=ts.JOINT_STEPS,
        do_sample=True,
        **ts.JOINT_WARP,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.stats.static_steps == "compile"
    assert result.stats.total.drafted > 0 and result.stats.total.acceptance_rate < 1.0
    tv = ts.total_variation(result.sequences[:, -ts.JOINT_STEPS :], exact)
    assert tv < 0.06, f"total variation {tv:.3f} between compiled StD samples and the exact distribution"


def test_shared_prefill_decodes_without_static_steps() -> None:
    """The shared-prefix path keeps the eager forward (its caches may share buffers)."""
    from tests.std_core import test_shared_prefill as sp

    c = sp.case("qwen2_vl")
    groups = [[c.questions[0][0]] + [sp._tokens_only(q) for q in c.questions[0][1:]]]
    decoder = SparseToDenseDecoder(c.tiny.model, StdConfig(gamma=4, sparse_budget=40, static_steps="eager"))
    result = generate_shared(decoder, groups, max_new_tokens=sp.MAX_NEW)
    assert result.stats.static_steps == "off"
    rows = list(zip(c.questions[0], c.references[0], strict=True))
    tm.assert_same(result.sequences, sp._expected(rows, c.pad))


def test_unsupported_language_model_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    c = ex.case("qwen2_vl")
    assert unsupported_reason(c.tiny.model) is None
    sliding = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention", "sliding_attention"]))
    assert "sliding" in unsupported_reason(
        SimpleNamespace(model=SimpleNamespace(language_model=sliding), lm_head=0)
    )
    assert "language_model" in unsupported_reason(SimpleNamespace(lm_head=0))
    monkeypatch.setattr(decoder_module, "unsupported_reason", lambda model: "sliding-window layers")
    result = c.decode(StdConfig(gamma=4, sparse_budget=40, **COMPILED))
    assert result.stats.static_steps == "off" and result.stats.compiles == 0
    tm.assert_same(result.sequences, c.reference)


@pytest.mark.gpu
def test_cuda_graphed_compiled_steps_equal_generate_on_gpu() -> None:
    """On CUDA, ``static_steps="compile"`` captures each step in a CUDA graph (inductor inside).
    fp32 greedy must equal ``generate`` there too (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tiny = tm.build("qwen2_vl")
    model = tiny.model.to("cuda")
    videos = [tm.random_video(t, h, w, seed=i) for i, (t, h, w) in enumerate(ex.SIZES["qwen2_vl"])]
    inputs = {k: v.to("cuda") for k, v in tm.make_inputs(tiny, videos, ex.PROMPTS).items()}
    reference = model.generate(**inputs, max_new_tokens=ex.MAX_NEW, do_sample=False)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        config = StdConfig(gamma=4, sparse_budget=40, compile_backend=backend)
        result = SparseToDenseDecoder(model, config).generate(**inputs, max_new_tokens=ex.MAX_NEW)
        assert result.stats.static_steps == "compile"
        assert torch.equal(result.sequences, reference), backend
