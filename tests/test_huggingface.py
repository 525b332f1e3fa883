"""Hugging Face models (issue 14): tiny random BERT, GPT-2 and Llama, every weight with a
bits knob or a reason, fidelity of the float model, rebuilds priced exactly, GPT-2's
Conv1D, the helper for a user's model, and a real search."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from orchestrator.thirdparty import prepare_torchvision

prepare_torchvision()  # before transformers (see orchestrator/thirdparty.py)
transformers = pytest.importorskip("transformers")

from orchestrator.batches import accuracy  # noqa: E402
from orchestrator.compress.structured import slice_model  # noqa: E402
from orchestrator.config import make_config  # noqa: E402
from orchestrator.evaluate import Evaluator, RecoverySettings  # noqa: E402
from orchestrator.prepare import build_space  # noqa: E402
from orchestrator.tasks import huggingface as hf  # noqa: E402
from search_spaces import derive_space, profile_model  # noqa: E402
from search_spaces.cost import policy_cost  # noqa: E402
from search_spaces.layers import layer_type  # noqa: E402
from search_spaces.layers.huggingface import CONV1D  # noqa: E402
from search_spaces.policy import Policy  # noqa: E402
from search_spaces.structure import DimSlice, GroupPlan, PruningPlan  # noqa: E402

SPEC = "orchestrator.tasks.huggingface"
TINY = ["bert_tiny", "gpt2_tiny", "llama_tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(task, model, space, evaluator) of a built-in tiny model, built once per module;
    plans cached in a temporary directory."""
    built: dict[str, tuple] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNESEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))

        def get(name: str) -> tuple:
            if name not in built:
                task, model, space = build_space(make_config({"task": f"{SPEC}:{name}"}))
                built[name] = (task, model, space,
                               Evaluator(task, space, recovery=RecoverySettings()))  # fmt: skip
            return built[name]

        yield get


# -- the spaces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        ("bert_tiny", {"cls.predictions.bias"}),
        ("gpt2_tiny", set()),
        ("llama_tiny", set()),
    ],  # fmt: skip
)
def test_every_weight_of_the_tiny_models_has_a_bits_knob_or_a_reason(tiny, name, skipped):
    _, model, space, _ = tiny(name)
    layers = {layer.name: layer for layer in space.profile.layers}
    with_bits = {n for k in space.knobs if k.kind == "bits" for n in k.layers}
    assert with_bits == set(layers)  # every compressible layer
    quantized = {w.key for n in with_bits for w in layers[n].weights}
    matrices = {k for k, p in model.named_parameters() if p.dim() >= 2}
    assert matrices <= quantized  # embeddings, projections, heads: every weight matrix
    # what is left (biases, norms) is float by design; a parameter of a module no layer
    # type knows is listed with why (BERT's output bias, a copy of the decoder's)
    assert set(space.skipped) == skipped
    assert all("kept in float" in reason for reason in space.skipped.values())


def test_gpt2s_conv1d_projections_are_layers_and_its_tied_head_has_its_own_weight(tiny):
    task, model, space, _ = tiny("gpt2_tiny")
    tokens = task.example_inputs()["input_ids"].numel()
    layers = {layer.name: layer for layer in space.profile.layers}
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert c_attn.kind == "Conv1D" and c_attn.shape == (64, 192) and c_attn.uses == tokens
    assert layers["transformer.h.1.mlp.c_proj"].shape == (128, 64)
    # tied in GPT2LMHeadModel; here each its own tensor, layer and knob, equal values
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert {"bits:lm_head", "bits:transformer.wte"} <= set(space.by_name)
    macs = sum(layer.numel * layer.uses for layer in space.profile.layers)
    assert policy_cost(space, Policy.uniform(space, 32, 1.0)).macs == macs
    # Conv1D is a node of Torch-Pruning's graph (its channel counts from our layer type):
    # the MLPs and the hidden width are cut as with conv1d_as_linear; the packed q/k/v and
    # the outputs are left out, saying why
    assert space.pruning == "structured"
    groups = {g.name: g for g in space.plan.groups}
    assert groups["transformer.h.0.mlp.c_fc"].channels == 128  # n_inner
    assert any(g.channels == 64 and "transformer.wte" in g.members for g in groups.values())
    assert {"transformer.h.0.attn.c_attn", "lm_head"} <= set(space.unpruned)


def test_structured_groups_of_bert_and_llama_and_what_is_left_out(tiny):
    _, _, bert, _ = tiny("bert_tiny")
    groups = {g.name: g for g in bert.plan.groups}
    assert bert.pruning == "structured"
    mlp = groups["bert.encoder.layer.0.intermediate.dense"]
    assert mlp.channels == 128 and "bert.encoder.layer.0.output.dense" in mlp.members
    residual = groups["bert.encoder.layer.1.output.dense"]  # the hidden width, embeddings too
    assert residual.channels == 64 and "bert.embeddings.word_embeddings" in residual.members
    assert "cut together" in bert.unpruned["bert.encoder.layer.0.attention.self.value"]
    _, _, llama, _ = tiny("llama_tiny")
    groups = {g.name: g for g in llama.plan.groups}
    gated = groups["model.layers.0.mlp.up_proj"]  # SwiGLU: gate and up rows, down columns
    assert set(gated.members) == {f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert "model.norm.weight" in {s.key for g in groups.values() for s in g.slices}
    for layer in range(2):  # grouped-query attention is not cut, and says why
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert llama.unpruned[f"model.layers.{layer}.self_attn.{proj}"]


# -- scoring and rebuilding ---------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_uniform_policies_score_on_the_tiny_models(tiny, name):
    _, _, space, evaluator = tiny(name)

    def score(text: str) -> float:
        return evaluator.evaluate(Policy.parse(space, text))["metric"]

    assert evaluator.base_metric() == score("uniform:32:1.0") == 1.0  # fidelity of the float
    eight, four_half = score("uniform:8:1.0"), score("uniform:4:0.5")
    assert 0.85 <= eight < 1.0
    assert 0.0 <= four_half < eight


@pytest.mark.parametrize("name", TINY)
def test_random_policies_rebuild_and_structured_ones_have_the_priced_params(tiny, name):
    _, _, space, evaluator = tiny(name)
    rng = random.Random(0)
    policies = [Policy.from_values(space, space.extreme_values("min"))]
    policies += [Policy.from_values(space, {k.name: rng.choice(k.choices) for k in space.knobs})
                 for _ in range(4)]  # fmt: skip
    for policy in policies:
        assert 0.0 <= evaluator.evaluate(policy)["metric"] <= 1.0
        if space.pruning == "structured":
            model = evaluator.compressed_model(policy)
            assert sum(p.numel() for p in model.parameters()) == policy_cost(space, policy).params


# -- GPT-2's Conv1D ------------------------------------------------------------------------


def _conv1d_mlp_group(model: nn.Module, block: int, channels: int) -> GroupPlan:
    """The group of block `block`'s MLP hidden channels, from the Conv1D layer type's cuts
    (as the planner builds a group from its members' cut_out / cut_in)."""
    prefix = f"transformer.h.{block}.mlp"
    c_fc, c_proj = model.get_submodule(f"{prefix}.c_fc"), model.get_submodule(f"{prefix}.c_proj")
    index = tuple((c,) for c in range(channels))
    slices = [
        DimSlice(key=f"{prefix}.c_fc.{t}", dim=d, index=index) for t, d, _ in CONV1D.cut_out(c_fc)
    ]
    slices += [DimSlice(key=f"{prefix}.c_proj.{t}", dim=d, index=index)
               for t, d, _ in CONV1D.cut_in(c_proj)]  # fmt: skip
    return GroupPlan(name=f"{prefix}.c_fc", channels=channels, members=(f"{prefix}.c_fc", f"{prefix}.c_proj"),
                     order=tuple(range(channels)), slices=tuple(slices))  # fmt: skip


def test_conv1d_is_sliced_as_the_linear_it_computes():
    model = hf.prepare_model(hf._gpt2())
    assert layer_type(model.transformer.h[0].mlp.c_fc) is CONV1D
    group = _conv1d_mlp_group(model, 0, 128)
    inputs = hf.token_batches(5, samples=2)
    small = slice_model(model, PruningPlan(groups=(group,)), {group.name: 40}).eval()
    c_fc, c_proj = small.transformer.h[0].mlp.c_fc, small.transformer.h[0].mlp.c_proj
    assert (c_fc.nx, c_fc.nf, tuple(c_fc.weight.shape), tuple(c_fc.bias.shape)) == (
        64,
        40,
        (64, 40),
        (40,),
    )
    assert (c_proj.nx, c_proj.nf, tuple(c_proj.weight.shape)) == (40, 64, (40, 64))
    # the same as the full model with the cut channels silenced (gelu(0) = 0)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, 40:] = 0
        model.transformer.h[0].mlp.c_fc.bias[40:] = 0
        expected = model(**inputs).logits
        assert torch.allclose(small(**inputs).logits, expected, atol=1e-5)


def test_conv1d_as_linear_computes_the_same_and_gives_gpt2_structured_groups():
    conv, linear = hf.prepare_model(hf._gpt2()), hf.prepare_model(hf._gpt2(), conv1d_as_linear=True)
    assert not any(type(m).__name__ == "Conv1D" for m in linear.modules())
    inputs = hf.token_batches(5, samples=4)
    with torch.no_grad():
        assert torch.allclose(conv(**inputs).logits, linear(**inputs).logits, atol=1e-5)
    from orchestrator.compress.plan import plan_groups

    example = {k: v[:1] for k, v in inputs.items()}
    profile = profile_model(linear, example)
    plan = plan_groups(linear, example, layer_names=[layer.name for layer in profile.layers])
    space = derive_space(profile, pruning="structured", plan=plan)
    groups = {g.name: g for g in plan.groups}
    assert groups["transformer.h.0.mlp.c_fc"].channels == 128  # n_inner
    assert any(g.channels == 64 and "transformer.wte" in g.members for g in plan.groups)
    assert "transformer.h.0.attn.c_attn" in space.unpruned  # packed q, k, v: left out, why


# -- the helper ----------------------------------------------------------------------------

WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat",
         "log", "tree", "quickly", "slowly"]  # fmt: skip


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]")  # fmt: skip


def _texts(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def _bert_config(**kwargs) -> object:
    return transformers.BertConfig(vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=16, initializer_range=0.1, **kwargs)  # fmt: skip


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(_bert_config(num_labels=3))


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(_bert_config())


def _evaluator(task) -> tuple[Evaluator, object]:
    profile = profile_model(task.model(), task.example_inputs())
    space = derive_space(profile, pruning="unstructured")
    return Evaluator(task, space, recovery=RecoverySettings()), space


def test_the_helper_tokenizes_texts_and_scores_a_classifier_by_fidelity():
    task = hf.huggingface_task(_classifier, _texts(20), tokenizer=_tokenizer(), batch_size=8,
                               name="clf")  # fmt: skip
    batches = task.validation()
    assert [len(t) for _, t in batches] == [8, 8, 4]  # one prediction per sequence
    assert all(t.dtype == torch.long for _, t in batches)
    inputs = batches[0][0]
    assert set(inputs) >= {"input_ids", "attention_mask"} and (inputs["attention_mask"] == 0).any()
    assert task.example_inputs()["input_ids"].shape[0] == 1
    evaluator, space = _evaluator(task)
    assert evaluator.base_metric() == 1.0
    assert 0.0 <= evaluator.evaluate(Policy.parse(space, "uniform:2:1.0"))["metric"] <= 1.0


def test_the_helper_takes_a_user_metric_with_labels_and_token_batches():
    labels = [i % 3 for i in range(20)]
    task = hf.huggingface_task(_classifier, _texts(20), tokenizer=_tokenizer(), batch_size=8,
                               metric=accuracy, labels=labels)  # fmt: skip
    assert task.metric is accuracy
    assert torch.cat([t for _, t in task.validation()]).tolist() == labels
    # already tokenized: one mapping per batch, as given
    ids = torch.randint(1, len(WORDS) + 2, (6, 10), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[:4], "attention_mask": torch.ones(4, 10, dtype=torch.long)},
               {"input_ids": ids[4:], "attention_mask": torch.ones(2, 10, dtype=torch.long)}]  # fmt: skip
    task = hf.huggingface_task(_classifier, batches)
    assert [len(t) for _, t in task.validation()] == [4, 2]
    assert task.metric(task.model(), task.validation()) == 1.0


def test_a_bare_encoder_is_scored_by_the_cosine_of_its_hidden_states():
    task = hf.huggingface_task(_encoder, _texts(12), tokenizer=_tokenizer(), batch_size=6)
    batches = task.validation()
    assert batches[0][1].is_floating_point() and batches[0][1].shape[-1] == 32
    evaluator, space = _evaluator(task)
    assert evaluator.base_metric() == pytest.approx(1.0, abs=1e-6)
    two = evaluator.evaluate(Policy.parse(space, "uniform:2:1.0"))["metric"]
    assert 0.0 < two < 0.999


def test_the_helper_loads_a_saved_checkpoint_and_tokenizer_by_path(tmp_path):
    _classifier().save_pretrained(tmp_path / "ckpt")
    _tokenizer().save_pretrained(tmp_path / "ckpt")
    path = str(tmp_path / "ckpt")
    task = hf.huggingface_task(path, _texts(8), tokenizer=path, batch_size=4)
    model = task.model()
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert task.name == f"hf-{path}" and task.metric(model, task.validation()) == 1.0


def test_the_helper_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match="zero-argument function"):
        hf.huggingface_task(_classifier(), _texts(4), tokenizer=_tokenizer())
    with pytest.raises(TypeError, match="need a tokenizer"):
        hf.huggingface_task(_classifier, _texts(4))
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        hf.huggingface_task(
            _classifier, _texts(4), tokenizer=_tokenizer(), labels=[0, 1, 2]
        ).validation()


def test_a_user_task_module_resolves_with_its_factory_and_token_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "hf_user_task.py").write_text(
        "import torch, transformers\n"
        "from orchestrator.tasks.huggingface import huggingface_task, token_batches\n"
        "def gpt2():\n"
        "    torch.manual_seed(0)\n"
        "    return transformers.GPT2LMHeadModel(transformers.GPT2Config(\n"
        "        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,\n"
        "        initializer_range=0.1, bos_token_id=63, eos_token_id=63))\n"
        "def make_task():\n"
        "    return huggingface_task(gpt2, token_batches(0, samples=16, length=16, vocab=64),\n"
        "                            batch_size=8, name='my-gpt2')\n"
    )
    task, _, space = build_space(make_config({"task": "hf_user_task:make_task"}))
    assert task.name == "my-gpt2" and "bits:transformer.h.0.mlp.c_fc" in space.by_name
    evaluator = Evaluator(task, space, recovery=RecoverySettings())
    assert evaluator.base_metric() == 1.0
    assert 0.0 <= evaluator.evaluate(Policy.parse(space, "uniform:4:0.5"))["metric"] <= 1.0


# -- a real search ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_search_on_gpt2_tiny(ray_cluster, tmp_path, monkeypatch):
    from orchestrator.search import run_search

    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    config = make_config({"task": f"{SPEC}:gpt2_tiny", "trials": 8, "workers": {"count": 1},
                          "out": str(tmp_path), "study": "hf", "seed": 0})  # fmt: skip
    result = run_search(config)
    assert result.error is None and result.base_metric == 1.0
    trials = result.trials
    assert len(trials) == 8 and trials["state"].isin(["COMPLETE", "PRUNED"]).all()
    float_trial = trials.set_index("trial").loc[0]
    assert float_trial["metric"] == 1.0 and float_trial["size_bytes"] == result.base_size
    assert not result.front.empty and result.front["size_bytes"].min() < result.base_size / 3
