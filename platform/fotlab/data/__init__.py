"""fotlab.data: corpora (HF datasets, local files, the embedded stdlib corpus), tokenizers, doc-aware K-packing,
synthetic tasks (dictionary lookup, passkey).

Entry points the training loop calls:
    tok = build_tokenizer(spec.data.tokenizer, texts=...)
    train_docs, val_docs = build_datasets(spec.data, tok, seed)
    packer = DocPacker(train_docs, batch_size, seq_len, packing, seed, rank, world_size, tok.bos_token_id,
                       tok.eos_token_id)
"""

from fotlab.data.build import build_datasets, corpus_texts, tokenize_dataset
from fotlab.data.packing import IGNORE_INDEX, DocPacker
from fotlab.data.sources import embedded_files, load_embedded, load_raw_source
from fotlab.data.synthetic import (
    PasskeyPrompt,
    dictionary_lookup_dataset,
    dictionary_lookup_doc,
    passkey_dataset,
    passkey_prompt,
    passkey_prompt_for_tokens,
)
from fotlab.data.tokenizer import build_tokenizer, byte_tokenizer, load_pretrained_tokenizer, train_bpe_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DocPacker",
    "PasskeyPrompt",
    "build_datasets",
    "build_tokenizer",
    "byte_tokenizer",
    "corpus_texts",
    "dictionary_lookup_dataset",
    "dictionary_lookup_doc",
    "embedded_files",
    "load_embedded",
    "load_pretrained_tokenizer",
    "load_raw_source",
    "passkey_dataset",
    "passkey_prompt",
    "passkey_prompt_for_tokens",
    "tokenize_dataset",
    "train_bpe_tokenizer",
]
