"""Integrations of the privacy engine with other training stacks (``dptrain.integrations.hf``:
the Hugging Face ``transformers.Trainer``)."""
