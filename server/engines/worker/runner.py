"""The model side of the worker: load one revision with transformers, run batches, post-process with
server/tasks/answers.py. Everything here runs in the worker process (torch is imported here only).

transformers 5 has no question-answering / summarization / translation / text2text pipelines: the
AutoModelFor* classes and ``generate`` are called directly; the post-processing is ours (server/tasks/answers.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from server.tasks import answers as tasks

log = logging.getLogger("hubserve.worker")

MODEL_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "zero-shot-classification": "AutoModelForSequenceClassification",
    "text-ranking": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "summarization": "AutoModelForSeq2SeqLM",
    "translation": "AutoModelForSeq2SeqLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
}
OUTPUT_KEYS = {
    "summarization": "summary_text", "translation": "translation_text", "text2text-generation": "generated_text",
}
QA_MAX_SEQ_LEN = 384


def select_device(device: str, dtype: str) -> tuple[Any, Any]:
    """(torch device, dtype): CUDA when asked for or present; on CPU float32 (fast kernels, exact scores), on a
    GPU the checkpoint's dtype unless the manifest names one."""
    import torch

    use_cuda = device == "gpu" or (device == "auto" and torch.cuda.is_available())
    torch_dtype: Any = getattr(torch, dtype) if dtype not in ("auto", "") else ("auto" if use_cuda else torch.float32)
    return torch.device("cuda" if use_cuda else "cpu"), torch_dtype


class Runner:
    """One model revision (offline, from the store at ``revision``) and a batch function per task family."""

    def __init__(self, repo: str, revision: str, task: str, device: str = "auto", trust_remote_code: bool = False,
                 dtype: str = "auto") -> None:
        import torch
        import transformers

        self.torch = torch
        self.task = task
        self.device, torch_dtype = select_device(device, dtype)
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(repo, **kwargs)
        model_cls = getattr(transformers, MODEL_CLASSES[task])
        self.model = model_cls.from_pretrained(repo, dtype=torch_dtype, **kwargs).to(self.device).eval()
        self.config = self.model.config
        self.id2label = {int(k): str(v) for k, v in (self.config.id2label or {}).items()}
        positions = getattr(self.config, "max_position_embeddings", None) or 1_000_000
        self.max_len = int(min(self.tokenizer.model_max_length or positions, positions))

    def info(self) -> dict[str, Any]:
        return {"task": self.task, "device": str(self.device), "max_model_len": self.max_len,
                "labels": [self.id2label[i] for i in sorted(self.id2label)]}

    def _forward(self, **encoded: Any) -> Any:
        with self.torch.inference_mode():
            return self.model(**{k: v.to(self.device) for k, v in encoded.items()})

    # ---- sequence classification: text-classification, zero-shot (pairs), text-ranking (pairs) ------------
    def logits(self, items: list[Any], key: Any = None) -> list[list[float]]:
        """Raw logits per item; an item is a text or a [text, text_pair] list."""
        firsts = [i if isinstance(i, str) else i[0] for i in items]
        pairs = [i[1] for i in items if not isinstance(i, str)]
        enc = self.tokenizer(firsts, pairs or None, padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        out = self._forward(**enc).logits.float().cpu().numpy()
        return [row.tolist() for row in out]

    def default_function(self) -> str:
        return tasks.default_function(len(self.id2label), getattr(self.config, "problem_type", None),
                                      getattr(self.config, "function_to_apply", None))

    # ---- token classification ---------------------------------------------------------------------------
    def entities(self, items: list[str], key: Any) -> list[list[dict[str, Any]]]:
        """Entities per text; with ``stride`` a long text is read in overlapping windows, merged after."""
        strategy, ignore, stride = key
        windows = {"stride": stride, "return_overflowing_tokens": True} if stride else {}
        enc = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt",
                             return_offsets_mapping=True, return_special_tokens_mask=True, **windows)
        sample_of = enc.pop("overflow_to_sample_mapping").tolist() if stride else list(range(len(items)))
        offsets = enc.pop("offset_mapping").numpy()
        special = enc.pop("special_tokens_mask").numpy()
        scores = tasks.softmax(self._forward(**enc).logits.float().cpu().numpy())
        ids = enc["input_ids"].numpy()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        word_aware = bool(getattr(getattr(backend, "model", None), "continuing_subword_prefix", None))
        out: list[list[dict[str, Any]]] = [[] for _ in items]
        for j, i in enumerate(sample_of):
            row_ids = [int(t) for t in ids[j]]
            pre = tasks.pre_entities(items[i], self.tokenizer.convert_ids_to_tokens(row_ids), row_ids, scores[j],
                                     [tuple(o) for o in offsets[j]], special[j], self.tokenizer.unk_token_id,
                                     word_aware)
            out[i] += tasks.token_entities(pre, self.id2label, strategy, ignore,
                                           self.tokenizer.convert_tokens_to_string)
        return [tasks.merge_overlapping(e) if sample_of.count(i) > 1 else e for i, e in enumerate(out)]

    # ---- fill-mask ----------------------------------------------------------------------------------------
    def target_ids(self, targets: list[str]) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in targets:
            token_id = vocab.get(target)
            if token_id is None:
                encoded = self.tokenizer(target, add_special_tokens=False, max_length=1, truncation=True)["input_ids"]
                if not encoded:
                    continue
                token_id = encoded[0]
            ids.append(int(token_id))
        return sorted(set(ids))

    def fill(self, items: list[str], key: Any) -> list[Any]:
        top_k, targets = key
        target_ids = self.target_ids(list(targets)) if targets else None
        enc = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        logits = self._forward(**enc).logits.float().cpu().numpy()
        ids = enc["input_ids"].numpy()
        mask_id, pad_id = self.tokenizer.mask_token_id, self.tokenizer.pad_token_id
        out: list[Any] = []
        for i in range(len(items)):
            positions = np.nonzero(ids[i] == mask_id)[0]
            single = len(positions) == 1
            rows = []
            for position, candidates in zip(positions, tasks.mask_candidates(logits[i, positions], top_k, target_ids),
                                            strict=True):
                row = []
                for token, score in candidates:
                    tokens = ids[i].copy()
                    tokens[position] = token
                    tokens = tokens[tokens != pad_id]
                    row.append({"score": score, "token": token, "token_str": self.tokenizer.decode([token]),
                                "sequence": self.tokenizer.decode(tokens, skip_special_tokens=single)})
                rows.append(row)
            out.append(rows[0] if single else rows)
        return out

    # ---- question answering -------------------------------------------------------------------------------
    def answers(self, items: list[tuple[str, str]], key: Any) -> list[list[dict[str, Any]]]:
        top_k, max_answer_len, impossible, doc_stride, max_seq_len, align = key
        max_seq_len = max_seq_len or min(self.max_len, QA_MAX_SEQ_LEN)
        stride = min(doc_stride or 128, max_seq_len // 2)
        questions = [q for q, _ in items]
        enc = self.tokenizer(questions, [c for _, c in items], padding=True, truncation="only_second",
                             max_length=max_seq_len, stride=stride, return_overflowing_tokens=True,
                             return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").numpy()
        sample_of = enc.pop("overflow_to_sample_mapping").numpy()
        out = self._forward(**enc)
        starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        ids, attention = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
        features: list[list[tasks.QAFeature]] = [[] for _ in items]
        for j, sample in enumerate(sample_of):
            sequence_ids = enc.sequence_ids(j)
            allowed = np.array([s == 1 for s in sequence_ids]) & (attention[j] == 1)
            allowed |= ids[j] == self.tokenizer.cls_token_id
            spans = [self._span(enc, j, t, offsets[j][t], align) if sequence_ids[t] == 1 else (0, 0)
                     for t in range(len(sequence_ids))]
            features[int(sample)].append(tasks.QAFeature(starts[j], ends[j], allowed, spans))
        return [tasks.qa_answers(features[i], items[i][1], top_k, max_answer_len, impossible)
                for i in range(len(items))]

    @staticmethod
    def _span(enc: Any, feature: int, token: int, offset: Any, align: bool) -> tuple[int, int]:
        """The character span of a context token: of its whole word when ``align`` (as transformers does)."""
        if align:
            word = enc.token_to_word(feature, token)
            if word is not None:
                chars = enc.word_to_chars(feature, word, sequence_index=1)
                return int(chars[0]), int(chars[1])
        return int(offset[0]), int(offset[1])

    # ---- seq2seq generation --------------------------------------------------------------------------------
    def generate(self, items: list[str], key: Any) -> list[dict[str, str]]:
        kwargs_items, src_lang, tgt_lang, clean_up, truncation = key
        kwargs = dict((getattr(self.config, "task_specific_params", None) or {}).get(self.task, {}))
        prefix = kwargs.pop("prefix", None) or getattr(self.config, "prefix", None) or ""
        kwargs |= dict(kwargs_items)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            self.torch.manual_seed(int(seed))
        if src_lang is not None and hasattr(self.tokenizer, "src_lang"):
            self.tokenizer.src_lang = src_lang
        if tgt_lang is not None:
            lang_id = self.tokenizer.convert_tokens_to_ids(tgt_lang)
            if isinstance(lang_id, int) and lang_id != self.tokenizer.unk_token_id:
                kwargs["forced_bos_token_id"] = lang_id
        enc = self.tokenizer([prefix + t for t in items], padding=True, return_tensors="pt",
                             truncation=truncation not in ("do_not_truncate", False), max_length=self.max_len)
        with self.torch.inference_mode():
            output = self.model.generate(**{k: v.to(self.device) for k, v in enc.items()}, **kwargs)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=bool(clean_up))
        return [{OUTPUT_KEYS[self.task]: text} for text in texts]
