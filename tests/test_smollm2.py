"""SmolLM2-135M as the language model of a LLaVA-style checkpoint, built offline from its GGUF."""

from __future__ import annotations

import json

import pytest
import torch

from icons_dagster.core.config import ModelConfig
from icons_dagster.core.model.encoding import ConversationEncoder
from icons_dagster.core.model.loading import load_base_model, load_processor, resolve_placement
from icons_dagster.core.model.samples import encode_record

from icons_dagster.demo import smollm2


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    try:
        smollm2.gguf_path()
    except FileNotFoundError as error:  # the README's test command installs it
        pytest.fail(str(error))
    return smollm2.build_smollm2_llava(tmp_path_factory.mktemp("smol") / "llava")


def test_the_checkpoint_carries_smollm2s_weights_and_a_chatml_template(smol_dir, demo_records):
    from transformers import AutoModelForCausalLM

    gguf = smollm2.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = ModelConfig(name_or_path=str(smol_dir), max_length=512)
    model = load_base_model(config, resolve_placement(config))
    ours = model.model.language_model.layers[7].mlp.down_proj.weight
    assert torch.equal(ours, reference.model.layers[7].mlp.down_proj.weight)
    # one more embedding row (the image token); the 49,152 pretrained rows unchanged
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == reference.config.vocab_size + 1
    assert torch.equal(embeddings[: reference.config.vocab_size], reference.get_input_embeddings().weight)

    processor = load_processor(config)
    record = next(r for r in demo_records if r.image and len(r.turns) == 2)
    sample = encode_record(ConversationEncoder(processor, 512), record)
    text = processor.tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>user\n")
    assert text.count("<image>") == 16 and "<|im_start|>assistant\n" in text
    # only the answer (and its end-of-turn) is labelled
    answer = processor.tokenizer.decode(sample.input_ids[sample.labels != -100])
    assert answer.startswith(record.turns[1].text) and answer.endswith("<|im_end|>\n")
    manifest = json.loads((smol_dir / "tiny_model.json").read_text())
    assert manifest["gguf"] == smollm2.GGUF_FILE and len(manifest["gguf_sha256"]) == 64


def test_projector_only_stage1_leaves_the_language_model_untouched(smol_dir, tmp_path):
    from safetensors.torch import load_file

    from icons_dagster.core.model.alignment import AlignmentRecipe, train_alignment
    from icons_dagster.demo.data import generate_alignment_data
    from icons_dagster.demo.stage1 import alignment_records

    records = alignment_records(generate_alignment_data(tmp_path / "align", 8))
    out = tmp_path / "stage1"
    recipe = AlignmentRecipe(steps=2, batch_size=4, learning_rate=1e-3, train="projector", num_threads=2)
    info = train_alignment(smol_dir, records, out, recipe)
    before, after = load_file(smol_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("multi_modal_projector" in name for name in changed)
    assert info["trained"] == ["model.multi_modal_projector"] and info["frozen"] == ["model.vision_tower", "model.language_model", "lm_head"]
    assert info["trainable_parameters"] == sum(v.numel() for k, v in before.items() if "multi_modal_projector" in k)
