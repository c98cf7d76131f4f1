"""`TextClassifier`: TorchServe's default text classification handler, without torchtext.

Each request is a text (the `data` field or the body). It is cleaned as TorchServe cleans it
(HTML removed, lowercased, contractions expanded, accents and punctuation removed), split
into words, extended with its bigrams (`ngrams` = 2) and looked up in the archive's
vocabulary (see `ts.torch_handler.text_handler` for the vocabulary forms tsctl reads). The
model is called as `model(token_ids, offsets)`, the form of an `nn.EmbeddingBag` model, and
each text is answered with every class's probability, `{label: probability}`, labels from
`index_to_name.json` when the archive has one.

TorchServe's handler reads only the first request of a batch; this one classifies every
request of the batch in one call (one bag per text, as `offsets` allows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ts.torch_handler.text_handler import TextHandler, Vocab, ngrams_iterator
from ts.torch_handler.vision_handler import captum_attr
from ts.utils.util import PredictionException, map_class_to_label

logger = logging.getLogger(__name__)


def request_text(row: Any, idx: int) -> str:
    """The text of one request: its `data` field or body, as UTF-8."""
    text = (row.get("data") or row.get("body")) if isinstance(row, dict) else row
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PredictionException(f"request {idx}: the text is not UTF-8 ({exc})", 400) from exc
    if not isinstance(text, str):
        raise PredictionException(
            f"request {idx}: expected a text (the body or a field named 'data'), "
            f"not {type(text).__name__}",
            400,
        )
    return text


class TextClassifier(TextHandler):
    """Texts in, each class's probability per text out."""

    ngrams = 2
    #: where each text's token ids start in the batch's tensor (set by `preprocess`)
    offsets: torch.Tensor | None = None
    #: the tokens of every text of the last batch (set by `preprocess`)
    batch_tokens: Sequence[list[str]] = ()

    def clean(self, text: str) -> list[str]:
        """TorchServe's clean-up steps, then the tokenizer."""
        text = self._remove_html_tags(text)
        text = text.lower()
        text = self._expand_contractions(text)
        text = self._remove_accented_characters(text)
        text = self._remove_punctuation(text)
        return self._tokenize(text)

    def token_ids(self, tokens: list[str]) -> list[int]:
        """The vocabulary ids of the tokens and their n-grams (unknown ones dropped when the
        vocabulary has no `<unk>`)."""
        grams = ngrams_iterator(tokens, self.ngrams)
        vocab = self.source_vocab
        if isinstance(vocab, Vocab):
            return [i for i in map(vocab.get, grams) if i is not None]
        return [int(vocab[gram]) for gram in grams]

    def preprocess(self, data: list[Any]) -> tuple[torch.Tensor, list[str]]:
        """All texts' token ids in one tensor (with `self.offsets`), and the first's tokens."""
        self.batch_tokens = [self.clean(request_text(row, i)) for i, row in enumerate(data)]
        ids = [self.token_ids(tokens) for tokens in self.batch_tokens]
        starts = [0]
        for row in ids[:-1]:
            starts.append(starts[-1] + len(row))
        self.offsets = torch.as_tensor(starts, dtype=torch.long, device=self.device)
        flat = [i for row in ids for i in row]
        text_tensor = torch.as_tensor(flat, dtype=torch.long, device=self.device)
        self.input_text = self.batch_tokens
        return text_tensor, self.batch_tokens[0] if self.batch_tokens else []

    def _offsets(self) -> torch.Tensor:
        if self.offsets is None:
            return torch.as_tensor([0], device=self.device)
        return self.offsets.to(self.device)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`model(token_ids, offsets)`."""
        text_tensor, _ = data
        result: torch.Tensor = super().inference(text_tensor, self._offsets())
        return result

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        """Softmax over the classes; each text's `{label: probability}`."""
        if data.dim() == 1:
            data = data.unsqueeze(0)
        probabilities: list[Any] = torch.softmax(data, dim=1).tolist()
        return map_class_to_label(probabilities, self.mapping)

    def get_insights(self, text_preprocess: Any, _: Any, target: Any = 0) -> list[dict[str, Any]]:
        """Each word's importance for class `target` in the first text (captum)."""
        text_tensor, all_tokens = text_preprocess
        offsets = self.offsets
        if offsets is not None and len(offsets) > 1:
            text_tensor = text_tensor[: int(offsets[1])]
        references = captum_attr().TokenReferenceBase()
        reference = references.generate_reference(text_tensor.shape[0], device=self.device)
        attributions = self.lig.attribute(
            text_tensor,
            reference.squeeze(0),
            additional_forward_args=(torch.as_tensor([0], device=self.device),),
            return_convergence_delta=False,
            target=target,
        )
        summary = self.summarize_attributions(attributions)
        return [{"importances": summary.tolist(), "words": self.get_word_token(all_tokens)}]
