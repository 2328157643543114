"""The behaviour-algebra report: do composed, scaled, negated and orthogonalized persona adapters
behave as their arithmetic says? ``conditions`` builds the adapters, ``report`` asks and scores
them, ``output`` writes algebra.md, algebra.json and the plots; ``character-training algebra``
(run/algebra.py) runs it on two finished runs."""
