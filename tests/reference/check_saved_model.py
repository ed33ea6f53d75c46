"""Loads a multipos-saved model directory with Python sentence-transformers and compares its
embeddings with the committed fixture (made from the original model).

    python tests/reference/check_saved_model.py SAVED_DIR tests/fixtures/minilm_embeddings.json
Prints the sentence-transformers version and the worst per-component difference; exits 1 above 1e-5.
"""
import json
import sys

import numpy as np
import sentence_transformers
from sentence_transformers import SentenceTransformer


def main(saved_dir: str, fixture_path: str) -> int:
    with open(fixture_path, encoding="utf-8") as f:
        fixture = json.load(f)
    model = SentenceTransformer(saved_dir, device="cpu")
    got = model.encode(fixture["texts"], batch_size=8, convert_to_numpy=True)
    want = np.asarray(fixture["embeddings"], dtype=np.float32)
    diff = float(np.abs(got - want).max())
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print(f"sentence-transformers {sentence_transformers.__version__}: loaded {saved_dir}, "
          f"max |diff| {diff:.2e}, min cosine {cos.min():.8f}, modules {[type(m).__name__ for m in model]}")
    return 0 if diff <= 1e-5 and cos.min() >= 0.99999 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
