"""transformers models from tiny configs against the explicit per-example loop.

Full fine-tuning of every causal LM the installed transformers builds cheaply, BERT/RoBERTa
sequence classification, T5 and BART (seq2seq LM loss); LoRA via peft with the q/v targets and
all-linear on each of them, and embedding LoRA, a trained embedding copy (``modules_to_save``)
and DoRA on q/v on a subset.  float64, eager attention, dropout 0, most samples clipped; the
whole clipped update must match the loop to 1e-5 relative.
"""

from __future__ import annotations

import pytest

from .builders import CAUSAL_LMS, OTHER_HF, hf_case, with_lora

ARCHS = [*CAUSAL_LMS, *OTHER_HF]
LORA_SUBSET = ["gpt2", "llama", "gemma", "opt", "phi3", "falcon", "bert-cls", "t5", "bart"]
TASK = {"bert-cls": "SEQ_CLS", "roberta-cls": "SEQ_CLS"}  # peft also trains the classifier


@pytest.mark.parametrize("arch", ARCHS)
def test_full_fine_tuning(exact, arch):
    exact("transformers, full fine-tuning", arch, hf_case(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_qv(exact, arch):
    exact(
        "transformers, LoRA",
        f"{arch} q/v",
        hf_case(arch),
        transform=lambda m: with_lora(m, "qv", TASK.get(arch)),
    )


ALL_LINEAR = [a for a in ARCHS if a != "mamba"]  # peft refuses LoRA on Mamba's conv1d/out_proj


@pytest.mark.parametrize("arch", ALL_LINEAR)
def test_lora_all_linear(exact, arch):
    exact(
        "transformers, LoRA",
        f"{arch} all-linear",
        hf_case(arch),
        transform=lambda m: with_lora(m, "all-linear", TASK.get(arch)),
    )


@pytest.mark.parametrize("kind", ["embedding", "modules-to-save", "dora"])
@pytest.mark.parametrize("arch", LORA_SUBSET)
def test_lora_kinds(exact, arch, kind):
    exact(
        "transformers, LoRA",
        f"{arch} {kind}",
        hf_case(arch),
        transform=lambda m: with_lora(m, kind, TASK.get(arch)),
    )
