"""Character-level tokenizer for the built-in tiny task.

Purpose: a real `tokenizers.Tokenizer` (so it saves as `tokenizer.json` next to the model and reloads with plain
`transformers`) whose vocabulary is the special tokens plus one token per character of an alphabet. The arithmetic
task uses `ARITH_ALPHABET` (digits, '+', '*', '='), which with the three specials gives a 16-token vocabulary.

Design limits:
- One token per character: no merges, no normaliser, no byte fallback, no unknown token. A character outside the
  alphabet makes encoding raise (the `tokenizers` message reads "Missing [UNK] token"), because silently dropping or
  mapping it would change what the model sees.
- Special tokens come first (`<pad>`=0, `<bos>`=1, `<eos>`=2) so their ids do not depend on the alphabet.
- Nothing is added automatically on encode: `tokenizer("12+34*56=")` gives exactly one id per character. `<bos>` is
  in the vocabulary for callers that want it, but the task does not use it (all prompts have the same length, so the
  model has a fixed anchor anyway), and a post-processor that adds it would put a `<bos>` in the middle of every
  completion that someone tokenizes with the defaults.
- Special tokens written as text (`"42<eos>"`) are recognised on encode, and `decode` keeps them unless
  `skip_special_tokens=True`; the arithmetic reward relies on seeing `<eos>` in the completion text.

Reload with `PreTrainedTokenizerFast.from_pretrained(folder)`. `AutoTokenizer` on a folder whose `config.json` says
`model_type: qwen2` may build a byte-level Qwen2 tokenizer instead (seen with transformers 4.x and 5.x), so do not use it here.

Run the tests: `python -m pytest tests/tasks -q`.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
# Order fixes the ids: pad=0, bos=1, eos=2, whatever the alphabet.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Everything the arithmetic task writes: operands and answers are digits, expressions use '+', '*' and '='.
ARITH_ALPHABET = "0123456789+*="

# The tiny task's sequences are at most ~16 tokens; this matches TINY_MODEL_CONFIG's max_position_embeddings so
# `tokenizer.model_max_length` tells callers the real limit instead of transformers' 1e30 placeholder.
DEFAULT_MODEL_MAX_LENGTH = 64


def _check_alphabet(alphabet: str) -> list[str]:
    """Return the alphabet as a list of characters after checking it can form a vocabulary."""
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")
    chars = list(alphabet)
    dup = sorted({c for c in chars if chars.count(c) > 1})
    if dup:
        raise ValueError(f"alphabet has repeated characters {dup!r}")
    # A special token is several characters long, so only a 1-char special could clash; check anyway so a future
    # change to SPECIAL_TOKENS cannot silently give two ids the same string.
    clash = sorted(set(chars) & set(SPECIAL_TOKENS))
    if clash:
        raise ValueError(f"alphabet characters {clash!r} collide with special tokens {SPECIAL_TOKENS!r}")
    return chars


def build_char_tokenizer(
    alphabet: str = ARITH_ALPHABET, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer: specials (pad, bos, eos) then one token per alphabet character.

    Args:
        alphabet: the characters the tokenizer accepts, each once; their ids follow the specials in this order.
        model_max_length: recorded in the tokenizer config (longest sequence the paired model accepts).

    Returns:
        A `PreTrainedTokenizerFast` with `pad_token`, `bos_token` and `eos_token` set; `len(tok) ==
        len(SPECIAL_TOKENS) + len(alphabet)`. It round-trips through `save_pretrained` /
        `PreTrainedTokenizerFast.from_pretrained` to identical ids.
    """
    chars = _check_alphabet(alphabet)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}

    # WordLevel with no unk token: each pre-token must be a vocabulary entry, otherwise encoding fails loudly.
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    # Split into single characters. Regex "." skips newlines, but "isolated" keeps unmatched pieces as their own
    # pre-tokens, so a newline still reaches WordLevel and fails there rather than vanishing.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Without a decoder, tokenizers joins tokens with spaces; Fuse concatenates them back into the original text.
    backend.decoder = decoders.Fuse()
    # Registering the specials lets "<eos>" written inside text be matched as one token before the split above.
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def build_arith_tokenizer() -> PreTrainedTokenizerFast:
    """The 16-token tokenizer of the built-in arithmetic task (`ARITH_ALPHABET` plus the specials)."""
    return build_char_tokenizer(ARITH_ALPHABET)


def encode_problem(tokenizer, text: str) -> str | None:
    """None if `tokenizer` encodes `text` to at least one token, else why not, naming the characters it cannot encode.

    A tokenizer without a usable unknown token (this module's, by design; the shipped tokenizer.json names `<unk>`
    only because `WordLevel` always serialises one) raises inside the tokenizers library on such a character with a
    message that names neither the character nor the text; this says which ones, before any work starts.
    """
    try:
        ids = tokenizer.encode(text)
    except Exception as exc:  # noqa: BLE001 -- the tokenizers library raises a bare Exception
        bad = []
        for char in sorted(set(text)):  # one by one: the characters the vocabulary lacks
            try:
                tokenizer.encode(char)
            except Exception:  # noqa: BLE001 -- as above
                bad.append(char)
        what = f"characters {bad} are not in its vocabulary ({len(tokenizer)} tokens)" if bad else str(exc)
        return f"the tokenizer cannot encode {text!r:.80}: {what}, and it has no unknown token to map them to"
    if not ids:
        return f"{text!r:.80} encodes to no tokens (the model needs at least one to condition on)"
    return None
