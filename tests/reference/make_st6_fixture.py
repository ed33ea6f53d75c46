"""Writes tests/fixtures/st6_tiny/: the tiny test model as sentence-transformers 6.x saves it (the
6.x layout: module types under sentence_transformers.base/sentence_transformer, no max_seq_length in
sentence_bert_config.json, `embedding_dimension`/`pooling_mode` in 1_Pooling/config.json), and
tests/fixtures/st6_tiny_embeddings.json: its embeddings of varied texts, as Python computes them.

Run on CPU with the pinned versions of requirements.txt:
    python tests/reference/make_st6_fixture.py TINY_DIR tests/fixtures
TINY_DIR is the tiny test model of `multipos::model::tiny::write_random_model` with
`TinySpec::default()` (older layout), as `cargo test --test st6_layout -- --ignored
write_the_tiny_model` writes it to target/tiny-model.
"""
import json
import os
import shutil
import sys

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

TEXTS = [
    "the lord is my shepherd",
    "what does my home insurance policy cover?",
    "A man said unto them: peace.",
    "Who has set the wild donkey free?",
    "x",
    " ".join(["faith and peace"] * 40),
]


def main(tiny_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    model = SentenceTransformer(tiny_dir, device="cpu")
    target = os.path.join(out_dir, "st6_tiny")
    shutil.rmtree(target, ignore_errors=True)
    model.save(target)
    # The card holds the machine's paths and times; the layout is what the fixture is for.
    os.remove(os.path.join(target, "README.md"))
    saved = SentenceTransformer(target, device="cpu")
    emb = saved.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    # The same model with prompts, as sentence-transformers applies them: encode_query takes the
    # "query" prompt, encode_document the "document" one, encode the default one.
    prompts = {"query": "query: ", "document": "passage: ", "classify": "topic of the text: "}
    prompted = SentenceTransformer(target, device="cpu", prompts=prompts, default_prompt_name="classify")
    fixture_prompts = {
        "prompts": prompts,
        "default_prompt_name": "classify",
        "query": prompted.encode_query(TEXTS, batch_size=4, convert_to_numpy=True).tolist(),
        "document": prompted.encode_document(TEXTS, batch_size=4, convert_to_numpy=True).tolist(),
        "text": prompted.encode(TEXTS, batch_size=4, convert_to_numpy=True).tolist(),
    }
    fixture = {
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "max_seq_length": saved.max_seq_length,
        "texts": TEXTS,
        "embeddings": emb.tolist(),
        "with_prompts": fixture_prompts,
    }
    with open(os.path.join(out_dir, "st6_tiny_embeddings.json"), "w") as f:
        json.dump(fixture, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
