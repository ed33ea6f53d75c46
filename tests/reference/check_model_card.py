"""Loads a multipos-saved model directory with Python sentence-transformers and reads its model card
as the Hugging Face Hub does (huggingface_hub.ModelCard: the YAML front matter, model-index parsed
into evaluation results). Prints one JSON object: the versions, the embedding shape, the front
matter's keys and values, and the evaluation results by metric type.

    python tests/reference/check_model_card.py MODEL_DIR
"""
import json
import sys

import huggingface_hub
import sentence_transformers
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer


def main(model_dir: str) -> int:
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(["a first text", "and a second one"])
    card = ModelCard.load(f"{model_dir}/README.md")
    data = card.data.to_dict()
    results = {r.metric_type: r.metric_value for r in (card.data.eval_results or [])}
    print(json.dumps({
        "sentence_transformers": sentence_transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "shape": list(emb.shape),
        "front_matter": data,
        "eval_results": results,
        "text": card.text,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
