"""Recovery: BatchNorm re-estimation and optional fine-tuning, in both pruning modes."""

from __future__ import annotations

import torch

from orchestrator.config import make_config
from orchestrator.evaluate import Evaluator, RecoverySettings
from orchestrator.prepare import build_space
from search_spaces.policy import Policy


def _evaluator(pruning: str, **recovery):
    task, _, space = build_space(make_config({"task": "digits-cnn", "pruning": pruning}))
    return Evaluator(task, space, recovery=RecoverySettings(**recovery)), space


def test_finetuning_recovers_accuracy_of_a_heavily_pruned_model():
    plain, space = _evaluator("structured")
    tuned, _ = _evaluator("structured", finetune_steps=30, lr=1e-3)
    policy = Policy.uniform(space, 8, 0.3)
    before, after = plain.evaluate(policy)["metric"], tuned.evaluate(policy)["metric"]
    assert after > before + 0.1
    # the base model is untouched: the float, unpruned policy still scores the base metric
    assert tuned.evaluate(Policy.uniform(space, 32, 1.0))["metric"] == plain.base_metric()


def test_finetuning_keeps_unstructured_masks():
    tuned, space = _evaluator("unstructured", finetune_steps=10, lr=1e-2)
    policy = Policy.uniform(space, 32, 0.3)
    seen = {}

    def spy(model, masks):
        tuned._finetune(model, masks)
        seen.update({k: v.clone() for k, v in masks.items()})

    model = tuned.rebuilder(policy, before_quantize=spy)
    settings = space.layer_settings(policy)
    params = dict(model.named_parameters())
    for layer in space.profile.layers:
        weight = params[layer.weights[0].key]
        if layer.weights[0].key in seen:
            assert int((weight != 0).sum()) <= settings[layer.name].keep_count
            assert torch.all(weight[~seen[layer.weights[0].key]] == 0)
    # and the next candidate starts from the base weights again
    again = tuned.rebuilder(Policy.uniform(space, 32, 1.0))
    base = tuned.task.model().state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, base[key]), key


def test_batchnorm_reestimation_helps_after_pruning():
    without, space = _evaluator("structured", bn_recalibration=False)
    with_bn, _ = _evaluator("structured")
    policy = Policy.uniform(space, 32, 0.5)
    assert with_bn.evaluate(policy)["metric"] > without.evaluate(policy)["metric"]
