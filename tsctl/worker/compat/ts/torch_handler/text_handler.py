"""`TextHandler`: TorchServe's base class for text handlers, without torchtext or captum.

It loads the archive's vocabulary and offers TorchServe's text clean-up steps (HTML removal,
contraction expansion, accent and punctuation removal, a `basic_english` tokenizer), with
TorchServe's method names: the clean-up calls `_remove_puncutation` (sic), which calls
`_remove_punctuation`, so a subclass overriding either is honoured. Contractions are expanded
from `CONTRACTIONS`, which gives TorchServe's expansions. `TokenBatch` is what a text
handler's `preprocess` hands to `inference`: TorchServe's `(token_ids, tokens)` pair, plus
where each text of the batch starts.

torchtext is not used (it is no longer maintained and does not install beside current torch).
TorchServe's archives store a pickled torchtext `Vocab` as `source_vocab.pt`, which cannot be
read without torchtext; tsctl reads a vocabulary saved as a plain `{token: id}` dict or a list
of tokens (`torch.save(vocab.get_stoi(), "source_vocab.pt")`), or a `source_vocab.json` of
either form, and says so clearly when it meets anything else. (With torchtext installed in
the worker's environment, a torchtext `Vocab` still loads.) Unknown tokens get the id of
`<unk>` when the vocabulary has one.

Explanations use captum's LayerIntegratedGradients over `model.embedding` when captum is
installed; it is imported on first use.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import string
import unicodedata
from abc import ABC
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ts.torch_handler._per_request import PerRequestSteps
from ts.torch_handler.base_handler import BaseHandler
from ts.torch_handler.vision_handler import captum_attr

logger = logging.getLogger(__name__)

#: HTML tags and character entities (`<br />`, `&amp;`, `&#39;`, `&#x27;`)
HTML_REGEX = re.compile(r"<[^>]*>|&(?:[a-z0-9]+|#[0-9]{1,6}|#x[0-9a-f]{1,6});", re.IGNORECASE)

VOCAB_HELP = (
    "save the vocabulary as a plain {token: id} dict or a list of tokens, e.g. "
    "torch.save(vocab.get_stoi(), 'source_vocab.pt'), or as source_vocab.json"
)

#: common English contractions and their expansions, as TorchServe's text handlers expand
#: them (a contraction not listed only loses its apostrophe, as there: "here's" -> "heres")
CONTRACTIONS = {
    # a verb and "not"
    "ain't": "is not",
    "aren't": "are not",
    "can't": "cannot",
    "couldn't": "could not",
    "didn't": "did not",
    "doesn't": "does not",
    "don't": "do not",
    "hadn't": "had not",
    "hasn't": "has not",
    "haven't": "have not",
    "isn't": "is not",
    "mayn't": "may not",
    "mightn't": "might not",
    "mustn't": "must not",
    "needn't": "need not",
    "oughtn't": "ought not",
    "shan't": "shall not",
    "sha'n't": "shall not",
    "shouldn't": "should not",
    "wasn't": "was not",
    "weren't": "were not",
    "won't": "will not",
    "wouldn't": "would not",
    # a pronoun and a verb
    "i'm": "i am",
    "i've": "i have",
    "i'll": "i will",
    "i'd": "i would",
    "you're": "you are",
    "you've": "you have",
    "you'll": "you will",
    "you'd": "you would",
    "he's": "he is",
    "he'll": "he will",
    "he'd": "he would",
    "she's": "she is",
    "she'll": "she will",
    "she'd": "she would",
    "it's": "it is",
    "it'll": "it will",
    "it'd": "it would",
    "we're": "we are",
    "we've": "we have",
    "we'll": "we will",
    "we'd": "we would",
    "they're": "they are",
    "they've": "they have",
    "they'll": "they will",
    "they'd": "they would",
    "y'all": "you all",
    "that's": "that is",
    "that'd": "that would",
    "there's": "there is",
    "there'd": "there would",
    # a question word and a verb ("'d" is "did" after how and where)
    "how's": "how is",
    "how'll": "how will",
    "how'd": "how did",
    "how'd'y": "how do you",
    "what's": "what is",
    "what're": "what are",
    "what've": "what have",
    "what'll": "what will",
    "when's": "when is",
    "when've": "when have",
    "where's": "where is",
    "where've": "where have",
    "where'd": "where did",
    "who's": "who is",
    "who've": "who have",
    "who'll": "who will",
    "why's": "why is",
    "why've": "why have",
    # a word and "have"
    "could've": "could have",
    "might've": "might have",
    "must've": "must have",
    "should've": "should have",
    "would've": "would have",
    "will've": "will have",
    "so've": "so have",
    "to've": "to have",
    # the rest
    "so's": "so as",
    "let's": "let us",
    "ma'am": "madam",
    "o'clock": "of the clock",
    "'cause": "because",
}
#: what a second contraction adds to a listed one ("they'd've", "y'all'd")
_SECOND_PARTS = {"'ve": " have", "'d": " would", "'re": " are"}
_CONTRACTION = re.compile(r"'cause\b|[a-z]+(?:'[a-z]+)+", re.IGNORECASE)

#: marks torchtext's `basic_english` keeps as tokens of their own, and those it drops
_KEPT_MARKS = ".,()!?"
_DROPPED_MARKS = ";:"


def basic_english(line: str) -> list[str]:
    """Tokens as torchtext's `basic_english` gives them: lowercased; an apostrophe starts a
    token of its own (`don't` gives `don`, `'`, `t`); `<br />` is a space; the marks in
    `_KEPT_MARKS` become tokens, double quotes and `_DROPPED_MARKS` vanish; split on
    whitespace."""
    text = line.lower().replace("'", " ' ").replace('"', "").replace("<br />", " ")
    for mark in _DROPPED_MARKS:
        text = text.replace(mark, " ")
    for mark in _KEPT_MARKS:
        text = text.replace(mark, f" {mark} ")
    return text.split()


def ngrams_iterator(tokens: list[str], ngrams: int) -> Iterator[str]:
    """The tokens, then every run of 2..`ngrams` consecutive tokens joined by a space."""
    yield from tokens
    for n in range(2, ngrams + 1):
        for start in range(len(tokens) - n + 1):
            yield " ".join(tokens[start : start + n])


def _expansion(lower: str) -> str | None:
    """The expansion of a lowercase contraction, or None when it is not one we know."""
    found = CONTRACTIONS.get(lower)
    if found is not None:
        return found
    for part, words in _SECOND_PARTS.items():
        if lower.endswith(part):
            first = _expansion(lower[: -len(part)])
            if first is not None:
                return first + words
    return None


def expand_contraction(word: str) -> str:
    """`don't` -> `do not`, `I'd've` -> `I would have`; a capital first letter stays one
    (`Ain't` -> `Is not`). A word that is no known contraction comes back as it is."""
    expanded = _expansion(word.lower())
    if expanded is None or not word[0].isupper():
        return word if expanded is None else expanded
    return expanded[0].upper() + expanded[1:]


class Vocab:
    """A token -> id table with the parts of torchtext's `Vocab` that handlers use.

    `vocab[token]` is the token's id, or the default index (that of `<unk>` when present)
    for an unknown token; without a default index an unknown token raises `KeyError`.
    """

    def __init__(self, stoi: dict[str, int], default_index: int | None = None) -> None:
        self._stoi = dict(stoi)
        self._default = default_index

    @classmethod
    def from_object(cls, value: Any, source: str) -> Vocab:
        """A `{token: id}` dict or a list of tokens (id = position)."""
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int) for k, v in value.items()
        ):
            stoi = value
        elif isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
            stoi = {token: i for i, token in enumerate(value)}
        else:
            raise ValueError(
                f"{source} holds a {type(value).__name__}, not a vocabulary: {VOCAB_HELP}"
            )
        return cls(stoi, stoi.get("<unk>"))

    def __getitem__(self, token: str) -> int:
        found = self._stoi.get(token, self._default)
        if found is None:
            raise KeyError(f"token {token!r} is not in the vocabulary, which has no <unk>")
        return found

    def get(self, token: str) -> int | None:
        """The token's id, the default index, or None."""
        return self._stoi.get(token, self._default)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __len__(self) -> int:
        return len(self._stoi)

    def get_stoi(self) -> dict[str, int]:
        return dict(self._stoi)

    def get_itos(self) -> list[str]:
        return [token for token, _ in sorted(self._stoi.items(), key=lambda item: item[1])]

    def lookup_indices(self, tokens: Iterable[str]) -> list[int]:
        return [self[token] for token in tokens]

    def get_default_index(self) -> int | None:
        return self._default

    def set_default_index(self, index: int | None) -> None:
        self._default = index


def load_vocab(path: str) -> Any:
    """The vocabulary in `path`: a `Vocab`, or a torchtext `Vocab` when torchtext is here."""
    name = os.path.basename(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            return Vocab.from_object(json.load(fh), name)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError):
        value = _load_pickled_vocab(path)
    if hasattr(value, "get_stoi") and not isinstance(value, Vocab):
        return value  # torchtext's own Vocab
    return Vocab.from_object(value, name)


def _load_pickled_vocab(path: str) -> Any:
    """A vocabulary that is more than plain data: only torchtext's can be used."""
    name = os.path.basename(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"{name} holds a pickled {exc.name or 'object'} object (TorchServe stores a "
            f"torchtext Vocab there), which needs {exc.name or 'its module'} to load; tsctl "
            f"does not use torchtext: {VOCAB_HELP}"
        ) from exc
    except Exception as exc:
        raise ValueError(f"{name} cannot be read as a vocabulary ({exc}): {VOCAB_HELP}") from exc


class TokenBatch(tuple[torch.Tensor, list[str]]):
    """`(token_ids, tokens)`, as TorchServe's `preprocess` returns them: the ids of every text
    of the batch, one after the other, and the first text's tokens; plus `offsets`, where
    each text's ids start, and `texts`, every text's tokens."""

    offsets: torch.Tensor
    texts: list[list[str]]

    def __new__(
        cls, ids: torch.Tensor, offsets: torch.Tensor, texts: list[list[str]]
    ) -> TokenBatch:
        batch = super().__new__(cls, (ids, texts[0] if texts else []))
        batch.offsets = offsets
        batch.texts = texts
        return batch


class TextHandler(PerRequestSteps, BaseHandler, ABC):
    """Base class of the text handlers: the vocabulary and the text clean-up steps."""

    _lig: Any = None  # a class-level default: subclasses need not call our __init__

    def __init__(self) -> None:
        super().__init__()
        self.source_vocab: Any = None
        self.tokenizer: Callable[[str], list[str]] = basic_english
        self.input_text: Any = None

    def initialize(self, context: Any) -> None:
        """BaseHandler's loading, then the vocabulary (`sourceVocab` in old manifests)."""
        super().initialize(context)
        self.initialized = False
        legacy = (self.manifest or {}).get("model", {}).get("sourceVocab")
        if legacy:
            model_dir = context.system_properties.get("model_dir") or ""
            self.source_vocab = load_vocab(os.path.join(model_dir, legacy))
        else:
            self.source_vocab = load_vocab(self.get_source_vocab_path(context))
        self.initialized = True

    @property
    def lig(self) -> Any:
        """captum's LayerIntegratedGradients over `model.embedding`, made on first use."""
        if self._lig is None:
            self._lig = captum_attr().LayerIntegratedGradients(self.model, self.model.embedding)
        return self._lig

    @lig.setter
    def lig(self, value: Any) -> None:
        self._lig = value

    def get_source_vocab_path(self, ctx: Any) -> str:
        """`source_vocab.pt` (or `source_vocab.json`) in the model directory."""
        model_dir = ctx.system_properties.get("model_dir") or ""
        for name in ("source_vocab.pt", "source_vocab.json"):
            path = os.path.join(model_dir, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"the archive has no source_vocab.pt or source_vocab.json (add it with "
            f"--extra-files): {VOCAB_HELP}"
        )

    def _expand_contractions(self, text: str) -> str:
        """Contractions spelled out (`don't` -> `do not`), then apostrophes removed."""
        text = _CONTRACTION.sub(lambda m: expand_contraction(m.group(0)), text)
        return text.replace("'", "")

    def _remove_accented_characters(self, text: str) -> str:
        """Accented letters as plain ASCII; other non-ASCII characters dropped."""
        return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")

    def _remove_html_tags(self, text: str) -> str:
        return HTML_REGEX.sub("", text)

    def _remove_puncutation(self, *args: Any, **kwargs: Any) -> str:
        """TorchServe's misspelt name for `_remove_punctuation`, which the clean-up calls: a
        subclass that overrides either name is honoured."""
        return self._remove_punctuation(*args, **kwargs)

    def _remove_punctuation(self, text: str) -> str:
        """ASCII punctuation removed."""
        return text.translate(str.maketrans("", "", string.punctuation))

    def _tokenize(self, text: str) -> list[str]:
        return self.tokenizer(text)

    def get_word_token(self, input_tokens: Iterable[str]) -> list[str]:
        """Tokens without the BPE space marker `Ġ`."""
        return [token.replace("Ġ", "") for token in input_tokens]

    def summarize_attributions(self, attributions: torch.Tensor) -> torch.Tensor:
        """Attributions softmaxed, then scaled by the norm of their sum over the last dim."""
        dim = 0 if attributions.dim() in (0, 1, 3) else 1  # torch's implicit softmax dim
        attributions = torch.softmax(attributions, dim=dim)
        total = attributions.sum(dim=-1)
        summary: torch.Tensor = attributions / torch.norm(total)
        return summary
