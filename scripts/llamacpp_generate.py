"""Greedy text from llama.cpp (a GGUF written by ``ffnkit export``) next to ffnkit's own, token for token.

Needs llama-cpp-python (``pip install 'ffnkit[llamacpp]'``: builds llama.cpp from its source distribution).
The prompt is tokenised twice, by the GGUF's tokenizer in llama.cpp (with the file's own BOS rule) and by
the transformers tokenizer saved with the model; llama.cpp then decodes greedily (top-k 1, no repetition
penalty) from its own ids, ffnkit with ``generate(do_sample=False)`` in float32; both stop at
``--tokens`` tokens or at the end-of-sequence token. Exit status 0 when ids and tokens agree, else 1.

    python scripts/llamacpp_generate.py A a.gguf --prompt "The king said to his daughter" --tokens 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def llama_cpp_greedy(llm, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy continuation of ``ids`` in llama.cpp: at most ``n`` tokens, the end token included."""
    out: list[int] = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n or int(tok) == eos:
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="folder written by ffnkit (compress, save) or a built-in model name")
    ap.add_argument("gguf", help="its GGUF export (ffnkit export MODEL --format gguf -o FILE)")
    ap.add_argument("--prompt", default="The king said to his daughter")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    import ffnkit

    # a folder: what ffnkit saved; otherwise a built-in or hub model name
    model, tok = ffnkit.load(args.model) if Path(args.model).is_dir() else ffnkit.load_model(args.model)
    llm = llama_cpp.Llama(args.gguf, n_ctx=512, n_threads=args.threads, verbose=False)
    ids_hf = tok(args.prompt)["input_ids"]
    ids_cpp = llm.tokenize(args.prompt.encode(), add_bos=True, special=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids_hf]), max_new_tokens=args.tokens, do_sample=False)
    want = out[0, len(ids_hf) :].tolist()
    got = llama_cpp_greedy(llm, ids_cpp, args.tokens, tok.eos_token_id)
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    print(f"prompt ids, transformers: {ids_hf}")
    print(f"prompt ids, llama.cpp:    {ids_cpp}")
    print(f"ffnkit    ({len(want)} tokens): {tok.decode(want)!r}")
    print(f"llama.cpp ({len(got)} tokens): {tok.decode(got)!r}")
    same = ids_hf == ids_cpp and got == want
    print(f"same prompt ids: {ids_hf == ids_cpp}; same greedy tokens: {got == want}", end="")
    print("" if got == want else f" (first difference at token {first_diff})")
    llm.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
