"""Text encoder: umT5-XXL's encoder as transformers' `UMT5EncoderModel`.

Wan ships it as its own `models_t5_umt5-xxl-enc-bf16.pth` (Wan key names); the diffusers-format repo
ships a `UMT5EncoderModel` folder. Prompts are cleaned like the original (ftfy, HTML unescape,
whitespace), padded to 512 tokens with an attention mask, encoded, and each output is trimmed to its
real length: the transformer zero-pads it back to 512 rows, so pad positions never reach it.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Mapping, Sequence

import ftfy
import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from model.network.configs import TEXT_LEN
from model.weights.keymaps import TensorRule, original_t5_key_map
from model.weights.streaming import CheckpointFiles, load_into_empty_model


def umt5_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> UMT5Config:
    """UMT5Config from the shapes of a Wan T5 checkpoint (original key names)."""
    vocab, d_model = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=shapes["blocks.0.attn.q.weight"][0] // heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",  # fc1(x) · gelu_tanh(gate(x))
        is_encoder_decoder=False,
        use_cache=False,
    )


def load_umt5_from_original(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> UMT5EncoderModel:
    source = CheckpointFiles([Path(path)])
    config = umt5_config_from_shapes(source.shapes())
    with init_empty_weights():
        model = UMT5EncoderModel(config)
    rules = {target: TensorRule(src) for src, target in original_t5_key_map(source.keys()).items()}
    load_into_empty_model(
        model, source, rules, dtype=dtype, device=device,
        tied={"encoder.embed_tokens.weight": "shared.weight"}, what=f"umT5 encoder {path}",
    )
    return model.eval()


def load_umt5_from_pretrained(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> UMT5EncoderModel:
    return UMT5EncoderModel.from_pretrained(folder, dtype=dtype, device_map={"": str(device)}).eval()


def clean_prompt(text: str) -> str:
    """The original's text cleaning: ftfy, HTML unescape twice, trim, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder:
    """Tokenizer + umT5 encoder producing per-prompt contexts trimmed to their real token count."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_tokenizer_dir(cls, model: UMT5EncoderModel, tokenizer_dir: Path) -> "WanTextEncoder":
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_dir))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """[B, L] ids and mask → list of [L_i, d_model] contexts (right padding trimmed)."""
        device = self.model.device
        hidden = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
        lengths = attention_mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return self.encode_ids(*self.tokenize(texts))
