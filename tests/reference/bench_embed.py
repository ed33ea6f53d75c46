"""Times sentence-transformers encoding for benches/embed_throughput.rs (same texts, threads, batch).

    python tests/reference/bench_embed.py MODEL_DIR TEXTS.jsonl THREADS BATCH_SIZE ROUNDS
Prints one JSON line: {"texts_per_s": best over rounds, "seconds": [...]}.
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main(model_dir, texts_path, threads, batch_size, rounds):
    torch.set_num_threads(threads)
    with open(texts_path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:batch_size], batch_size=batch_size)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"texts_per_s": len(texts) / min(seconds), "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
