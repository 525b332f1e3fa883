"""How a policy is applied to a model: quantization, pruning, rebuild."""
