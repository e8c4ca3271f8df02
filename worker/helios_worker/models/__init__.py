"""Models: partial loading of HF causal LMs (loading), the project's own early-exit models
(tasks, tokenizer, presets, training, cache). Import the submodules; this package imports nothing."""
