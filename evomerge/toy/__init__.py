"""The toy suite: a tiny Llama base, experts on synthetic tasks, data splits."""
